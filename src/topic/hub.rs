//! `Hub` and `Topic`: the newest snapshot of every topic in an `ArcSwap` slot,
//! and `Follower`, the per-reader cursor that turns "something changed" into
//! "send this one newest version".

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, Weak};

use arc_swap::ArcSwapOption;
use tokio::sync::Notify;

use super::{Position, Snapshot, TopicName};

/// One topic: its newest version and the readers waiting for the next one.
#[derive(Debug)]
pub struct Topic {
    /// The topic's name, kept here so a follower can report it.
    name: TopicName,
    /// The newest version this hub knows, or `None` before the topic's first
    /// version arrives. An `ArcSwap` so that readers load it without a lock
    /// and a writer replaces it without waiting for them.
    slot: ArcSwapOption<Snapshot>,
    /// Wakes every waiting single-topic follower after the slot changes.
    /// Followers arm their `Notified` before they look at the slot, so no
    /// change is missed.
    changed: Notify,
    /// Multi-topic subscriptions following this topic: each has one `Notify`
    /// of its own, poked with `notify_one` (which stores a permit, so a poke
    /// that arrives before the subscription waits is not lost). A `std`
    /// mutex: held only to walk or edit the list, never across an await.
    listeners: Mutex<Vec<Weak<Notify>>>,
}

impl Topic {
    fn new(name: TopicName) -> Self {
        Self { name, slot: ArcSwapOption::empty(), changed: Notify::new(), listeners: Mutex::new(Vec::new()) }
    }

    /// The topic's name.
    pub fn name(&self) -> &TopicName {
        &self.name
    }

    /// The newest version (live or tombstone), if any.
    pub fn current(&self) -> Option<Arc<Snapshot>> {
        self.slot.load_full()
    }

    /// The newest version if the topic is live.
    pub fn live(&self) -> Option<Arc<Snapshot>> {
        self.current().filter(|s| !s.deleted)
    }

    /// Installs `snapshot` if it is newer than what the slot holds; returns
    /// whether it did. Versions never go backwards here, whatever order
    /// writers (HTTP handlers, the bus, a resync) arrive in.
    fn apply(&self, mut snapshot: Snapshot) -> bool {
        let mut current = self.slot.load();
        loop {
            if current.as_ref().is_some_and(|c| c.version >= snapshot.version) {
                return false;
            }
            // Remember the state this version replaces, so that a reader who
            // holds it can be sent a delta instead of the whole state.
            snapshot.base = current
                .as_ref()
                .filter(|c| !c.deleted && !snapshot.deleted && c.epoch == snapshot.epoch)
                .map(|c| (c.position(), c.state.clone()));
            let candidate = Arc::new(snapshot);
            let previous = self.slot.compare_and_swap(&*current, Some(Arc::clone(&candidate)));
            let won = match (&*previous, &*current) {
                (Some(p), Some(c)) => Arc::ptr_eq(p, c),
                (None, None) => true,
                _ => false,
            };
            if won {
                break;
            }
            current = previous;
            // The swap failed, so the slot never saw `candidate`: ours again.
            snapshot = Arc::into_inner(candidate).expect("an unpublished snapshot has one owner");
        }
        self.changed.notify_waiters();
        self.lock_listeners().retain(|listener| match listener.upgrade() {
            Some(signal) => {
                signal.notify_one();
                true
            }
            None => false,
        });
        true
    }

    pub(super) fn lock_listeners(&self) -> std::sync::MutexGuard<'_, Vec<Weak<Notify>>> {
        // Each critical section is a push, a retain or a scan: a panic cannot
        // leave the list inconsistent, so poisoning is ignored.
        self.listeners.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds a multi-topic subscription's signal (once).
    pub(super) fn listen(&self, signal: &Arc<Notify>) {
        let mut listeners = self.lock_listeners();
        let mine = Arc::downgrade(signal);
        if !listeners.iter().any(|l| Weak::ptr_eq(l, &mine)) {
            listeners.push(mine);
        }
    }

    /// Removes a multi-topic subscription's signal.
    pub(super) fn unlisten(&self, signal: &Arc<Notify>) {
        let mine = Arc::downgrade(signal);
        self.lock_listeners().retain(|l| !Weak::ptr_eq(l, &mine) && l.strong_count() > 0);
    }
}

/// All topics this hub knows, by name. Cheap to clone.
///
/// The map sits behind a `std` `RwLock` because every access is a short
/// lookup or insert that never awaits; the hot path (readers waiting for and
/// loading versions) touches only a `Topic`, never the map.
#[derive(Debug, Clone, Default)]
pub struct Hub {
    topics: Arc<RwLock<HashMap<TopicName, Arc<Topic>>>>,
}

impl Hub {
    /// An empty hub.
    pub fn new() -> Self {
        Self::default()
    }

    /// The topic called `name`, if this hub has heard of it.
    pub fn get(&self, name: &str) -> Option<Arc<Topic>> {
        self.read().get(name).cloned()
    }

    /// The topic called `name`, created empty if needed so a reader can wait
    /// for its first version.
    fn get_or_insert(&self, name: &TopicName) -> Arc<Topic> {
        if let Some(topic) = self.get(name.as_str()) {
            return topic;
        }
        let mut topics = self.write();
        Arc::clone(topics.entry(name.clone()).or_insert_with(|| Arc::new(Topic::new(name.clone()))))
    }

    /// Installs a committed version if it is newer than what the hub holds,
    /// and wakes that topic's followers. Returns whether it was installed.
    pub fn apply(&self, snapshot: Snapshot) -> bool {
        let topic = self.get_or_insert(&snapshot.topic);
        topic.apply(snapshot)
    }

    /// The newest live version of every public topic, sorted by name.
    /// Internal topics (`_stats`) are never listed.
    pub fn live_topics(&self) -> Vec<Arc<Snapshot>> {
        let mut out: Vec<_> = self.read().values().filter(|t| !t.name.is_internal()).filter_map(|t| t.live()).collect();
        out.sort_by(|a, b| a.topic.cmp(&b.topic));
        out
    }

    /// How many public topics hold a live version: internal topics count
    /// neither in `spillway_topics` nor against `--max-topics`.
    pub fn live_count(&self) -> usize {
        self.read().values().filter(|t| !t.name.is_internal() && t.live().is_some()).count()
    }

    /// A cursor for one reader of `name`, starting from what the reader says
    /// it holds (`since`), or from nothing.
    pub fn follow(&self, name: &TopicName, since: Option<Position>) -> Follower {
        Follower { topic: self.get_or_insert(name), hub: self.clone(), held: since }
    }

    /// Forgets `topic` if it never had a version and nobody else follows it,
    /// so readers waiting for names that never appear leave nothing behind.
    fn release(&self, topic: &Arc<Topic>) {
        if topic.slot.load().is_some() {
            return;
        }
        let mut topics = self.write();
        // Two references: the map's and the departing follower's. Holding the
        // write lock, nobody can take a third from the map meanwhile.
        if Arc::strong_count(topic) <= 2 && topic.slot.load().is_none() {
            topics.remove(topic.name.as_str());
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<TopicName, Arc<Topic>>> {
        // A panic while holding this lock cannot leave the map half-updated
        // (each critical section is a single insert, remove or clone), so a
        // poisoned lock is safe to keep using.
        self.topics.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<TopicName, Arc<Topic>>> {
        self.topics.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What a follower should send next.
#[derive(Debug)]
pub enum Delivery {
    /// A version newer than what the reader holds, and how many versions the
    /// reader never received in between.
    Snapshot {
        /// The newest version.
        snapshot: Arc<Snapshot>,
        /// Versions the reader skipped since its previous one.
        skipped: u64,
        /// What the reader held before this delivery: a transport sends a
        /// delta instead when this is the snapshot's `base`.
        previous: Option<Position>,
    },
    /// The incarnation the reader holds was deleted.
    Deleted(Arc<Snapshot>),
}

/// One reader's cursor on one topic: the newest-state-not-a-queue rule.
///
/// It holds what the reader last received (one pointer) and nothing else, so
/// a reader costs the same whatever the publish rate: a slow reader simply
/// skips the versions that were replaced while it was busy.
#[derive(Debug)]
pub struct Follower {
    /// The topic followed.
    topic: Arc<Topic>,
    /// The hub, to forget the topic entry when the last follower of a
    /// never-created topic leaves.
    hub: Hub,
    /// What the reader holds: from `since` at first, then the last delivery.
    /// A position, not the snapshot itself, so a reader pins no old version.
    held: Option<Position>,
}

impl Follower {
    /// The topic followed.
    pub fn topic(&self) -> &Arc<Topic> {
        &self.topic
    }

    /// What the reader holds now.
    pub fn held(&self) -> Option<Position> {
        self.held
    }

    /// The delivery due now, if any, and records it as held. Never returns an
    /// older version than the reader holds within the same epoch.
    pub fn take(&mut self) -> Option<Delivery> {
        let current = self.topic.current()?;
        let delivery = self.due(&current)?;
        self.held = Some(current.position());
        Some(delivery)
    }

    fn due(&self, current: &Arc<Snapshot>) -> Option<Delivery> {
        Some(match self.plan(current)? {
            Plan::Snapshot { skipped } => {
                Delivery::Snapshot { snapshot: Arc::clone(current), skipped, previous: self.held }
            }
            Plan::Deleted => Delivery::Deleted(Arc::clone(current)),
        })
    }

    /// What is due given the topic's newest version, decided without touching
    /// the snapshot's reference count: `is_due` runs on every wake-up of every
    /// reader, and a shared count bumped by all of them would bounce its cache
    /// line between cores.
    fn plan(&self, current: &Snapshot) -> Option<Plan> {
        let Some(held) = self.held else {
            // A reader that holds nothing waits through a deletion for the
            // topic to be created again.
            return (!current.deleted).then_some(Plan::Snapshot { skipped: 0 });
        };
        if current.version <= held.version && current.epoch == held.epoch {
            return None;
        }
        if current.deleted {
            // Only the incarnation the reader holds matters to it.
            return (current.epoch == held.epoch).then_some(Plan::Deleted);
        }
        // Versions keep rising across a delete and re-create, so the count
        // is meaningful across epochs too; a rebuilt store (lower versions
        // under a new epoch) counts as nothing skipped.
        Some(Plan::Snapshot { skipped: current.version.saturating_sub(held.version.saturating_add(1)) })
    }

    /// Whether a delivery is due now.
    pub fn is_due(&self) -> bool {
        // A borrowed load: no reference count is touched, and the guard
        // lives only for this comparison.
        let current = self.topic.slot.load();
        current.as_deref().is_some_and(|current| self.plan(current).is_some())
    }

    /// Waits until a delivery is due, then returns it.
    pub async fn wait_next(&mut self) -> Delivery {
        loop {
            let topic = Arc::clone(&self.topic);
            let notified = topic.changed.notified();
            let mut notified = std::pin::pin!(notified);
            // Arm before looking, so a change between the look and the wait
            // still wakes us.
            notified.as_mut().enable();
            if let Some(delivery) = self.take() {
                return delivery;
            }
            notified.await;
        }
    }

    /// Resolves when a delivery is due, without taking it. Cancel-safe, so a
    /// transport can race it against its socket in `select!`.
    pub async fn ready(&self) {
        // Most calls come right after a wake-up, when the delivery is already
        // due: answer those without registering in the topic's `Notify`,
        // whose waiter list is one lock shared by every reader of the topic.
        if self.is_due() {
            return;
        }
        loop {
            let notified = self.topic.changed.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if self.is_due() {
                return;
            }
            notified.await;
        }
    }
}

/// What a follower owes its reader, before any snapshot is cloned for it.
enum Plan {
    /// The newest version, after `skipped` versions the reader never got.
    Snapshot { skipped: u64 },
    /// The deletion of the incarnation the reader holds.
    Deleted,
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.hub.release(&self.topic);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::topic::Epoch;

    fn name(s: &str) -> TopicName {
        TopicName::parse(s).expect("valid")
    }

    fn live(topic: &str, epoch: u64, version: u64) -> Snapshot {
        Snapshot::live(name(topic), Epoch::from_u64(epoch), version, 0, Bytes::from_static(b"{}"))
    }

    #[test]
    fn versions_never_go_backwards() {
        let hub = Hub::new();
        assert!(hub.apply(live("t", 1, 5)));
        assert!(!hub.apply(live("t", 1, 4)));
        assert!(!hub.apply(live("t", 1, 5)));
        assert_eq!(hub.get("t").and_then(|t| t.current()).map(|s| s.version), Some(5));
    }

    #[test]
    fn a_slow_follower_skips_to_the_newest() {
        let hub = Hub::new();
        let mut f = hub.follow(&name("t"), None);
        assert!(f.take().is_none(), "nothing before the first version");
        hub.apply(live("t", 1, 1));
        match f.take() {
            Some(Delivery::Snapshot { snapshot, skipped, .. }) => assert_eq!((snapshot.version, skipped), (1, 0)),
            other => panic!("{other:?}"),
        }
        for v in 2..=100 {
            hub.apply(live("t", 1, v));
        }
        match f.take() {
            Some(Delivery::Snapshot { snapshot, skipped, .. }) => assert_eq!((snapshot.version, skipped), (100, 98)),
            other => panic!("{other:?}"),
        }
        assert!(f.take().is_none(), "nothing is resent");
    }

    #[test]
    fn since_suppresses_what_the_reader_has() {
        let hub = Hub::new();
        hub.apply(live("t", 7, 3));
        let held = Position { epoch: Epoch::from_u64(7), version: 3 };
        assert!(hub.follow(&name("t"), Some(held)).take().is_none());
        let ahead = Position { epoch: Epoch::from_u64(7), version: 9 };
        assert!(hub.follow(&name("t"), Some(ahead)).take().is_none(), "a lagging hub never sends older");
        let other = Position { epoch: Epoch::from_u64(8), version: 9 };
        assert!(matches!(hub.follow(&name("t"), Some(other)).take(), Some(Delivery::Snapshot { .. })));
    }

    #[test]
    fn deletion_reaches_holders_and_new_readers_wait() {
        let hub = Hub::new();
        hub.apply(live("t", 1, 1));
        let mut holder = hub.follow(&name("t"), None);
        assert!(holder.take().is_some());
        hub.apply(Snapshot::tombstone(name("t"), Epoch::from_u64(1), 2, 0));
        assert!(matches!(holder.take(), Some(Delivery::Deleted(_))));
        let mut newcomer = hub.follow(&name("t"), None);
        assert!(newcomer.take().is_none());
        hub.apply(live("t", 2, 3));
        assert!(matches!(newcomer.take(), Some(Delivery::Snapshot { .. })));
    }

    #[test]
    fn waiting_for_a_name_that_never_appears_leaves_nothing() {
        let hub = Hub::new();
        drop(hub.follow(&name("ghost"), None));
        assert!(hub.get("ghost").is_none());
        hub.apply(live("real", 1, 1));
        drop(hub.follow(&name("real"), None));
        assert!(hub.get("real").is_some());
    }

    #[test]
    fn internal_topics_are_neither_listed_nor_counted() {
        let hub = Hub::new();
        hub.apply(live("t", 1, 1));
        let stats = TopicName::internal("_stats");
        hub.apply(Snapshot::live(stats.clone(), Epoch::from_u64(1), 1, 0, Bytes::from_static(b"{}")));
        assert_eq!(hub.live_count(), 1);
        assert_eq!(hub.live_topics().iter().map(|s| s.topic.as_str()).collect::<Vec<_>>(), ["t"]);
        assert!(hub.follow(&stats, None).take().is_some(), "an internal topic can still be followed from inside");
    }

    #[tokio::test]
    async fn a_waiting_follower_wakes_on_publish() {
        let hub = Hub::new();
        let mut f = hub.follow(&name("t"), None);
        let publisher = {
            let hub = hub.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                hub.apply(live("t", 1, 1));
            })
        };
        let got = tokio::time::timeout(Duration::from_secs(5), f.wait_next()).await.expect("woke");
        assert!(matches!(got, Delivery::Snapshot { .. }));
        publisher.await.expect("publisher");
    }
}
