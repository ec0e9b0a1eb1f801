//! `Subscription`: the followers of one reader connection, one or many
//! topics, served newest-first and fairly. Every transport (WebSocket, SSE,
//! long-poll) drives one; a transport only turns deliveries into bytes.

use std::sync::Arc;

use tokio::sync::Notify;

use super::{Delivery, Follower, Position, TopicName};

/// Why a topic could not be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeError {
    /// The connection already follows its maximum number of topics.
    TooMany {
        /// The limit in force.
        limit: usize,
    },
}

/// The topics one connection follows.
///
/// A single-topic subscription waits on its topic's own `Notify` and costs
/// nothing extra. A multi-topic one owns a `Notify` that every followed topic
/// pokes on change, so it waits on one thing however many topics it follows.
#[derive(Debug)]
pub struct Subscription {
    /// The followers, in subscription order.
    followers: Vec<Follower>,
    /// Where the next fair scan starts: just after the topic served last, so a
    /// burst on one topic cannot starve the others.
    cursor: usize,
    /// The multi-topic wake-up signal, `None` for a fixed single topic.
    signal: Option<Arc<Notify>>,
    /// Most topics this subscription may follow.
    limit: usize,
}

impl Subscription {
    /// A subscription to exactly one topic, for the lifetime of the connection.
    pub fn single(follower: Follower) -> Self {
        Self { followers: vec![follower], cursor: 0, signal: None, limit: 1 }
    }

    /// An empty subscription that may follow up to `limit` topics.
    pub fn multi(limit: usize) -> Self {
        Self { followers: Vec::new(), cursor: 0, signal: Some(Arc::new(Notify::new())), limit }
    }

    /// Follows another topic, or restarts following it from `since` if it is
    /// already followed.
    pub fn add(&mut self, follower: Follower) -> Result<(), SubscribeError> {
        if let Some(existing) = self.followers.iter_mut().find(|f| f.topic().name() == follower.topic().name()) {
            *existing = follower;
        } else {
            if self.followers.len() >= self.limit {
                return Err(SubscribeError::TooMany { limit: self.limit });
            }
            self.followers.push(follower);
        }
        if let Some(signal) = &self.signal {
            for f in &self.followers {
                f.topic().listen(signal);
            }
            // Whatever is due already must be seen by the next wait.
            signal.notify_one();
        }
        Ok(())
    }

    /// Stops following `name`; returns whether it was followed.
    pub fn remove(&mut self, name: &str) -> bool {
        let Some(index) = self.followers.iter().position(|f| f.topic().name().as_str() == name) else {
            return false;
        };
        let follower = self.followers.remove(index);
        if let Some(signal) = &self.signal {
            follower.topic().unlisten(signal);
        }
        if self.cursor > index {
            self.cursor -= 1;
        }
        true
    }

    /// How many topics are followed.
    pub fn len(&self) -> usize {
        self.followers.len()
    }

    /// Whether no topic is followed.
    pub fn is_empty(&self) -> bool {
        self.followers.is_empty()
    }

    /// Each followed topic and the position the reader holds in it.
    pub fn positions(&self) -> impl Iterator<Item = (&TopicName, Option<Position>)> {
        self.followers.iter().map(|f| (f.topic().name(), f.held()))
    }

    /// Whether some delivery is due now (the reader is behind).
    pub fn is_due(&self) -> bool {
        self.followers.iter().any(Follower::is_due)
    }

    /// The next delivery due, taking topics in turn.
    pub fn take(&mut self) -> Option<Delivery> {
        let n = self.followers.len();
        for step in 0..n {
            let index = (self.cursor + step) % n;
            if let Some(delivery) = self.followers[index].take() {
                self.cursor = (index + 1) % n;
                return Some(delivery);
            }
        }
        None
    }

    /// Resolves when some delivery is due. Cancel-safe: a transport races it
    /// against its socket and timers.
    pub async fn ready(&self) {
        match (&self.signal, self.followers.as_slice()) {
            (None, [only]) => only.ready().await,
            // As in `Follower::ready`: a delivery already due is answered
            // without touching the signal's waiter list.
            (Some(_), followers) if followers.iter().any(Follower::is_due) => {}
            (Some(signal), followers) => loop {
                let notified = signal.notified();
                let mut notified = std::pin::pin!(notified);
                notified.as_mut().enable();
                if followers.iter().any(Follower::is_due) {
                    return;
                }
                notified.await;
            },
            (None, _) => std::future::pending().await,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(signal) = &self.signal {
            for f in &self.followers {
                f.topic().unlisten(signal);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::topic::{Epoch, Hub, Snapshot};

    fn live(topic: &str, version: u64) -> Snapshot {
        let name = TopicName::parse(topic).expect("valid");
        Snapshot::live(name, Epoch::from_u64(1), version, 0, Bytes::from_static(b"{}"))
    }

    fn follow(hub: &Hub, topic: &str) -> Follower {
        hub.follow(&TopicName::parse(topic).expect("valid"), None)
    }

    #[test]
    fn a_burst_on_one_topic_does_not_starve_another() {
        let hub = Hub::new();
        let mut sub = Subscription::multi(8);
        sub.add(follow(&hub, "busy")).expect("add");
        sub.add(follow(&hub, "quiet")).expect("add");
        hub.apply(live("quiet", 1));
        let mut served = Vec::new();
        for v in 1..=50 {
            hub.apply(live("busy", v));
            if let Some(Delivery::Snapshot { snapshot, .. }) = sub.take() {
                served.push(snapshot.topic.to_string());
            }
            if served.contains(&"quiet".to_string()) {
                break;
            }
        }
        assert!(served.iter().position(|t| t == "quiet").is_some_and(|i| i <= 1), "{served:?}");
    }

    #[test]
    fn the_limit_holds_and_resubscribing_replaces() {
        let hub = Hub::new();
        let mut sub = Subscription::multi(2);
        sub.add(follow(&hub, "a")).expect("a");
        sub.add(follow(&hub, "b")).expect("b");
        assert_eq!(sub.add(follow(&hub, "c")), Err(SubscribeError::TooMany { limit: 2 }));
        sub.add(follow(&hub, "a")).expect("re-subscribing is not a new topic");
        assert_eq!(sub.len(), 2);
        assert!(sub.remove("a"));
        assert!(!sub.remove("a"));
        sub.add(follow(&hub, "c")).expect("room again");
    }

    #[tokio::test]
    async fn a_multi_subscription_wakes_on_any_topic() {
        let hub = Hub::new();
        let mut sub = Subscription::multi(8);
        for t in ["a", "b", "c"] {
            sub.add(follow(&hub, t)).expect("add");
        }
        let publisher = {
            let hub = hub.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                hub.apply(live("c", 1));
            })
        };
        tokio::time::timeout(Duration::from_secs(5), sub.ready()).await.expect("woke");
        assert!(matches!(sub.take(), Some(Delivery::Snapshot { .. })));
        publisher.await.expect("publisher");
        drop(sub);
        let topic = hub.get("c").expect("topic");
        hub.apply(live("c", 2));
        assert!(topic.lock_listeners().is_empty(), "a dropped subscription leaves no listener");
    }
}
