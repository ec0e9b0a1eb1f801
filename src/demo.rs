//! Demo mode (`--demo`): a simulated live match published on topic `demo`
//! through the same store and hub as any publisher, so a newcomer running the
//! binary sees a live scoreboard at `/t/demo` at once.
//!
//! Match time runs fast (15 s of match per real second, so a match lasts about
//! seven minutes); the clock changes every second, goals and cards come now
//! and then, and a new match starts after full time.

use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::store::{Change, Store, Write};
use crate::topic::{Hub, TopicName};

/// Match seconds that pass per tick (one real second).
const MATCH_SECONDS_PER_TICK: u32 = 15;
/// Ticks spent at half time and after full time before the next match.
const BREAK_TICKS: u32 = 12;
/// Events kept in the state: enough for a match, bounded so the state stays small.
const MAX_EVENTS: usize = 20;

const HOME: (&str, [&str; 5]) = ("Riverside Rovers", ["Okafor", "Lindqvist", "Moreau", "Baptiste", "Kowalczyk"]);
const AWAY: (&str, [&str; 5]) = ("Harbour City", ["Tanaka", "Alves", "O'Neill", "Haddad", "Brennan"]);

/// Runs the simulated match until `shutdown` fires.
pub async fn run(store: Store, hub: Hub, bus: Bus, shutdown: CancellationToken) {
    let Ok(topic) = TopicName::parse("demo") else { return };
    let mut game = Game::new();
    // The first write replaces whatever an earlier run left; later ticks send
    // only what changed, as a real score feed would.
    publish(&store, &hub, &bus, &topic, Change::Put(game.state())).await;
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        let change = match game.tick() {
            Step::Patch(patch) => Change::Patch(patch),
            Step::Restart => Change::Put(game.state()),
            Step::Nothing => continue,
        };
        publish(&store, &hub, &bus, &topic, change).await;
    }
}

/// Commits a change and installs it in the hub, as `http::publish` does for a
/// publisher, so versions still come only from the store.
async fn publish(store: &Store, hub: &Hub, bus: &Bus, topic: &TopicName, change: Change) {
    match store.write(Write::new(topic.clone(), change)).await {
        Ok(snapshot) => {
            bus.announce(&snapshot);
            hub.apply(snapshot);
        }
        Err(error) => tracing::warn!(%error, "demo: publish failed"),
    }
}

/// What a tick changes.
enum Step {
    /// A merge patch onto the current state.
    Patch(Map<String, Value>),
    /// A new match: replace the whole state.
    Restart,
    /// Nothing changed (a break): no version is spent on it.
    Nothing,
}

/// Where the match stands.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Phase {
    FirstHalf,
    HalfTime,
    SecondHalf,
    FullTime,
}

/// The simulated match.
struct Game {
    phase: Phase,
    /// Match seconds played in the current half (stoppage time included).
    clock: u32,
    /// Ticks spent in a break.
    break_ticks: u32,
    score: (u32, u32),
    events: Vec<Value>,
}

impl Game {
    fn new() -> Self {
        Self { phase: Phase::FirstHalf, clock: 0, break_ticks: 0, score: (0, 0), events: Vec::new() }
    }

    fn state(&self) -> Map<String, Value> {
        let state = json!({
            "home": {"name": HOME.0, "score": self.score.0},
            "away": {"name": AWAY.0, "score": self.score.1},
            "clock": self.clock_text(),
            "period": self.period_text(),
            "status": self.status_text(),
            "events": self.events,
        });
        match state {
            Value::Object(map) => map,
            _ => Map::new(),
        }
    }

    /// The match clock as a reader expects it: minutes count on from 45:00
    /// in the second half.
    fn clock_text(&self) -> String {
        let total = match self.phase {
            Phase::FirstHalf | Phase::HalfTime => self.clock,
            Phase::SecondHalf | Phase::FullTime => 45 * 60 + self.clock,
        };
        format!("{:02}:{:02}", total / 60, total % 60)
    }

    fn period_text(&self) -> &'static str {
        match self.phase {
            Phase::FirstHalf => "1st half",
            Phase::HalfTime => "Half time",
            Phase::SecondHalf => "2nd half",
            Phase::FullTime => "Full time",
        }
    }

    fn status_text(&self) -> &'static str {
        match self.phase {
            Phase::FirstHalf | Phase::SecondHalf => "Live",
            Phase::HalfTime => "Break",
            Phase::FullTime => "Finished",
        }
    }

    fn minute(&self) -> u32 {
        let base = if self.phase == Phase::SecondHalf { 45 } else { 0 };
        base + self.clock / 60 + 1
    }

    fn tick(&mut self) -> Step {
        match self.phase {
            Phase::HalfTime | Phase::FullTime => {
                self.break_ticks += 1;
                if self.break_ticks < BREAK_TICKS {
                    return Step::Nothing;
                }
                self.break_ticks = 0;
                if self.phase == Phase::FullTime {
                    *self = Self::new();
                    return Step::Restart;
                }
                self.phase = Phase::SecondHalf;
                self.clock = 0;
                self.event("Second half under way".to_owned());
                self.patch(&["clock", "period", "status", "events"])
            }
            Phase::FirstHalf | Phase::SecondHalf => {
                self.clock += MATCH_SECONDS_PER_TICK;
                let mut changed = vec!["clock"];
                // About three goals and four cards a match, as in real play.
                let ticks_per_match = (90 * 60 / MATCH_SECONDS_PER_TICK) as usize;
                if fastrand::usize(..ticks_per_match) < 3 {
                    let home = fastrand::bool();
                    let (team, players) = if home { HOME } else { AWAY };
                    if home {
                        self.score.0 += 1
                    } else {
                        self.score.1 += 1
                    }
                    self.event(format!("Goal! {} ({team}) {}–{}", pick(&players), self.score.0, self.score.1));
                    changed.extend(["home", "away", "events"]);
                } else if fastrand::usize(..ticks_per_match) < 4 {
                    let (team, players) = if fastrand::bool() { HOME } else { AWAY };
                    let card = if fastrand::u8(..8) == 0 { "Red card" } else { "Yellow card" };
                    self.event(format!("{card}: {} ({team})", pick(&players)));
                    changed.push("events");
                }
                if self.clock >= 45 * 60 + stoppage(self.phase) {
                    self.phase = if self.phase == Phase::FirstHalf { Phase::HalfTime } else { Phase::FullTime };
                    let (h, a) = self.score;
                    let text = if self.phase == Phase::HalfTime { "Half time" } else { "Full time" };
                    self.event(format!("{text}: {} {h}–{a} {}", HOME.0, AWAY.0));
                    changed.extend(["period", "status", "events"]);
                }
                self.patch(&changed)
            }
        }
    }

    fn event(&mut self, text: String) {
        let minute = self.minute().min(if self.phase == Phase::FirstHalf { 45 } else { 90 });
        self.events.push(json!({"minute": minute, "text": text}));
        if self.events.len() > MAX_EVENTS {
            self.events.remove(0);
        }
    }

    /// A merge patch carrying the current value of `keys`.
    fn patch(&self, keys: &[&str]) -> Step {
        let state = self.state();
        Step::Patch(keys.iter().filter_map(|k| state.get(*k).map(|v| ((*k).to_owned(), v.clone()))).collect())
    }
}

/// Added time at the end of a half, in match seconds: a fixed figure keeps
/// the demo predictable.
fn stoppage(phase: Phase) -> u32 {
    if phase == Phase::FirstHalf { 2 * 60 } else { 4 * 60 }
}

fn pick(players: &[&'static str; 5]) -> &'static str {
    players[fastrand::usize(..players.len())]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_match_runs_from_kick_off_to_a_new_match() {
        let mut game = Game::new();
        let mut restarts = 0;
        for _ in 0..2000 {
            if let Step::Restart = game.tick() {
                restarts += 1;
            }
            let state = game.state();
            assert!(state["clock"].as_str().is_some_and(|c| c.len() == 5));
            assert!(state["events"].as_array().is_some_and(|e| e.len() <= MAX_EVENTS));
        }
        assert!(restarts >= 1, "a match ends and another starts");
    }
}
