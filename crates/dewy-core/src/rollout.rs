//! Staged rollouts over the cache a fleet already shares: a canary, then
//! waves, each host of a wave healthy for a bake time before the next wave
//! opens; halted after too many failures, optionally reverted.
//!
//! The only shared state is one record per release in the cache
//! (`rollout.<tag>--<artifact>`, see [`Record`]), created with a
//! create-only write and changed only by compare-and-swap
//! ([`Cache::write_if`]): S3 `If-Match`, GCS `ifGenerationMatch`, a lock
//! and the file's identity on a shared folder. There is no coordinator.
//! Every time in the record is by the storage's clock ([`BucketClock`]), so
//! a host whose clock is off neither steals a slot nor keeps one.

use std::collections::BTreeMap;
use std::time::Duration;

use dewy_cache::{Cache, Key};
use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// A number of hosts: absolute, or a percentage of the live fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// This many hosts.
    Hosts(u32),
    /// This percentage of the live fleet, rounded up.
    Percent(u32),
}

impl Count {
    /// How many hosts of a live fleet of `fleet`: at least one.
    pub fn of(self, fleet: usize) -> usize {
        match self {
            Self::Hosts(n) => n as usize,
            Self::Percent(p) => (fleet * p as usize).div_ceil(100),
        }
        .max(1)
    }

    fn parse(option: &str, value: &str) -> Result<Self, String> {
        let bad = || format!("rollout option `{option}={value}`: expected a number of hosts (2) or a percentage (25%)");
        match value.strip_suffix('%') {
            Some(p) => match p.parse::<u32>() {
                Ok(p) if (1..=100).contains(&p) => Ok(Self::Percent(p)),
                _ => Err(bad()),
            },
            None => match value.parse::<u32>() {
                Ok(n) if n >= 1 => Ok(Self::Hosts(n)),
                _ => Err(bad()),
            },
        }
    }
}

impl std::fmt::Display for Count {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Hosts(n) => write!(f, "{n}"),
            Self::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// How a release reaches the fleet: `--rollout
/// canary=1,bake=5m,max-parallel=25%,max-failures=1,auto-revert`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Hosts of the first wave.
    pub canary: Count,
    /// How long every host of a wave must stay healthy before the next
    /// wave opens.
    pub bake: Duration,
    /// Hosts of each later wave (so, deploying at once).
    pub max_parallel: Count,
    /// Failures that halt the rollout.
    pub max_failures: u32,
    /// When halted, hosts that took the release go back to the one they
    /// ran before.
    pub auto_revert: bool,
    /// How long a slot holds without being renewed: a host that dies
    /// mid-deploy frees its slot after this.
    pub lease: Duration,
}

impl Default for Plan {
    fn default() -> Self {
        Self {
            canary: Count::Hosts(1),
            bake: Duration::from_secs(300),
            max_parallel: Count::Percent(25),
            max_failures: 1,
            auto_revert: false,
            lease: Duration::from_secs(60),
        }
    }
}

impl std::str::FromStr for Plan {
    type Err = String;

    /// `canary=1,bake=5m,max-parallel=25%,max-failures=1,auto-revert,lease=1m`;
    /// options left out keep their defaults.
    fn from_str(text: &str) -> Result<Self, String> {
        let mut plan = Self::default();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (option, value) = part.split_once('=').unwrap_or((part, ""));
            let duration = || {
                humantime::parse_duration(value)
                    .map_err(|_| format!("rollout option `{option}={value}`: expected a duration such as 5m"))
            };
            match option {
                "canary" => plan.canary = Count::parse(option, value)?,
                "max-parallel" => plan.max_parallel = Count::parse(option, value)?,
                "bake" => plan.bake = duration()?,
                "lease" => {
                    plan.lease = duration()?;
                    if plan.lease < Duration::from_secs(5) {
                        return Err(format!("rollout option `lease={value}`: at least 5s"));
                    }
                }
                "max-failures" => {
                    plan.max_failures = value
                        .parse()
                        .ok()
                        .filter(|n| *n >= 1)
                        .ok_or_else(|| format!("rollout option `max-failures={value}`: expected a number ≥ 1"))?;
                }
                "auto-revert" => {
                    plan.auto_revert = match value {
                        "" | "true" => true,
                        "false" => false,
                        _ => return Err(format!("rollout option `auto-revert={value}`: expected true or false")),
                    }
                }
                other => {
                    return Err(format!(
                        "unknown rollout option `{other}`; valid options: canary, bake, max-parallel, max-failures, auto-revert, lease"
                    ));
                }
            }
        }
        Ok(plan)
    }
}

impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "canary={},bake={},max-parallel={},max-failures={},auto-revert={},lease={}",
            self.canary,
            humantime::format_duration(self.bake),
            self.max_parallel,
            self.max_failures,
            self.auto_revert,
            humantime::format_duration(self.lease)
        )
    }
}

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Hosts join waves.
    Active,
    /// An operator paused it: no host starts it; hosts already on it stay.
    Paused,
    /// Too many failures: no host starts it; with `auto-revert`, hosts that
    /// took it go back.
    Halted,
    /// An operator aborted it: no host starts it, and hosts that took it go
    /// back to what they ran before.
    Aborted,
    /// Every live host runs it: hosts that come later deploy it at once,
    /// and hosts no longer read the record.
    Complete,
}

impl State {
    /// `active`, `paused`, `halted`, `aborted`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Paused => "paused",
            Self::Halted => "halted",
            Self::Aborted => "aborted",
            Self::Complete => "complete",
        }
    }
}

/// Where one host stands in a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Holds a slot and deploys.
    Deploying,
    /// Deployed; must stay healthy for the bake time.
    Baking,
    /// Healthy for the bake time.
    Done,
    /// Its deploy failed (start, health check, crash while baking).
    Failed,
    /// Went back to its previous release after a halt or abort.
    Reverted,
}

impl Phase {
    /// `deploying`, `baking`, …
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deploying => "deploying",
            Self::Baking => "baking",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Reverted => "reverted",
        }
    }

    /// Holds a place in its wave.
    fn in_wave(self) -> bool {
        matches!(self, Self::Deploying | Self::Baking | Self::Done)
    }

    /// Holds a lease that must be renewed.
    fn leased(self) -> bool {
        matches!(self, Self::Deploying | Self::Baking)
    }
}

/// One host's place in a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    /// Its wave (0: the canary).
    pub wave: u32,
    /// Its phase.
    pub phase: Phase,
    /// When it entered this phase (storage clock).
    pub since: Timestamp,
    /// When its slot expires unless renewed (deploying and baking only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_until: Option<Timestamp>,
    /// The version it ran before (where a revert goes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The record of one release's rollout: `rollout.<tag>--<artifact>` in the
/// shared cache, JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The release's tag.
    pub release: String,
    /// Its artifact key.
    pub artifact: String,
    /// The plan, as the first host to see the release wrote it (every
    /// host follows the record's plan).
    pub plan: String,
    /// Where it stands.
    pub state: State,
    /// Why it was halted, paused or aborted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The wave open now.
    pub wave: u32,
    /// Failures so far.
    pub failures: u32,
    /// The host that created it.
    pub created_by: String,
    /// When (storage clock).
    pub created_at: Timestamp,
    /// The last writer.
    pub updated_by: String,
    /// When (storage clock).
    pub updated_at: Timestamp,
    /// Every host that took a slot, by host id.
    pub hosts: BTreeMap<String, Slot>,
}

/// What [`Record::admit`] decided for a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Deploy now: the host holds a slot in `wave`.
    Go {
        /// The wave.
        wave: u32,
    },
    /// Not yet (the wave is full, or baking).
    Wait(String),
    /// Never: halted, aborted, or this host already failed it.
    Stopped(String),
}

impl Record {
    /// A new record for `artifact` (its key), created by `host`.
    pub fn new(release: &str, artifact: &Key, plan: &Plan, host: &str, now: Timestamp) -> Self {
        Self {
            release: release.to_owned(),
            artifact: artifact.to_string(),
            plan: plan.to_string(),
            state: State::Active,
            reason: None,
            wave: 0,
            failures: 0,
            created_by: host.to_owned(),
            created_at: now,
            updated_by: host.to_owned(),
            updated_at: now,
            hosts: BTreeMap::new(),
        }
    }

    /// The record's plan (the default plan if it cannot be read, which only
    /// a hand-edited record can cause).
    pub fn plan(&self) -> Plan {
        self.plan.parse().unwrap_or_default()
    }

    /// How many hosts wave `wave` takes in a live fleet of `fleet`.
    pub fn capacity(&self, wave: u32, fleet: usize) -> usize {
        let plan = self.plan();
        if wave == 0 {
            plan.canary.of(fleet)
        } else {
            plan.max_parallel.of(fleet)
        }
    }

    /// Removes the slots whose lease ran out (their host died or lost the
    /// bucket): returns their hosts.
    pub fn expire(&mut self, now: Timestamp) -> Vec<String> {
        let expired: Vec<String> = self
            .hosts
            .iter()
            .filter(|(_, s)| s.phase.leased() && s.lease_until.is_some_and(|t| t < now))
            .map(|(h, _)| h.clone())
            .collect();
        for host in &expired {
            self.hosts.remove(host);
        }
        expired
    }

    /// Whether `host` may deploy now in a live fleet of `fleet` hosts;
    /// takes a slot for it when it may (`from`: the version it runs now).
    pub fn admit(&mut self, host: &str, fleet: usize, from: Option<String>, now: Timestamp) -> Admission {
        let lease = lease_of(&self.plan());
        match self.state {
            State::Active | State::Complete => {}
            State::Paused => {
                return Admission::Wait(format!(
                    "the rollout is paused{}",
                    self.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default()
                ));
            }
            State::Halted | State::Aborted => {
                return Admission::Stopped(format!(
                    "the rollout is {}{}",
                    self.state.as_str(),
                    self.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default()
                ));
            }
        }
        if let Some(slot) = self.hosts.get_mut(host) {
            match slot.phase {
                Phase::Failed => {
                    return Admission::Stopped(format!(
                        "this host failed it: {}",
                        slot.error.as_deref().unwrap_or("no reason recorded")
                    ));
                }
                Phase::Reverted => return Admission::Stopped("this host reverted it".into()),
                // Its slot holds (a retry after a transient error, or a
                // deploy undone by an operator): deploy again.
                Phase::Deploying | Phase::Baking | Phase::Done => {
                    slot.phase = Phase::Deploying;
                    slot.since = now;
                    slot.lease_until = Some(now + lease);
                    return Admission::Go { wave: slot.wave };
                }
            }
        }
        let members = |wave: u32| -> Vec<Phase> {
            self.hosts
                .values()
                .filter(|s| s.wave == wave && s.phase.in_wave())
                .map(|s| s.phase)
                .collect()
        };
        let current = members(self.wave);
        let wave = if self.state == State::Complete || current.len() < self.capacity(self.wave, fleet) {
            self.wave
        } else if current.iter().all(|p| *p == Phase::Done) {
            self.wave + 1
        } else {
            let baking = current.iter().filter(|p| **p != Phase::Done).count();
            return Admission::Wait(format!(
                "wave {} is full: {baking} of its {} hosts still deploying or baking",
                self.wave,
                current.len()
            ));
        };
        self.wave = wave;
        self.hosts.insert(
            host.to_owned(),
            Slot {
                wave,
                phase: Phase::Deploying,
                since: now,
                lease_until: Some(now + lease),
                from,
                error: None,
            },
        );
        Admission::Go { wave }
    }

    /// The earliest time the open wave can let the next host in: when the
    /// bakes of its hosts can have ended (for a host still deploying, a
    /// bake starting now). `None` when none of them is deploying or baking.
    pub fn wave_opens_at(&self, now: Timestamp) -> Option<Timestamp> {
        let bake = SignedDuration::try_from(self.plan().bake).unwrap_or_default();
        self.hosts
            .values()
            .filter(|s| s.wave == self.wave)
            .filter_map(|s| match s.phase {
                Phase::Deploying => Some(now.max(s.since) + bake),
                Phase::Baking => Some(s.since + bake),
                _ => None,
            })
            .max()
    }

    /// Counts of hosts per phase, for status lines.
    pub fn counts(&self) -> BTreeMap<&'static str, usize> {
        let mut out = BTreeMap::new();
        for slot in self.hosts.values() {
            *out.entry(slot.phase.as_str()).or_default() += 1;
        }
        out
    }

    /// Moves `host` to `phase` (renewing its lease when leased).
    fn set_phase(&mut self, host: &str, phase: Phase, now: Timestamp) -> bool {
        let lease = lease_of(&self.plan());
        let Some(slot) = self.hosts.get_mut(host) else {
            return false;
        };
        slot.phase = phase;
        slot.since = now;
        slot.lease_until = phase.leased().then_some(now + lease);
        true
    }

    /// Records a failure of `host` and halts the rollout when the failures
    /// reach `max-failures`. Returns whether this halted it.
    pub fn fail(&mut self, host: &str, error: &str, now: Timestamp) -> bool {
        if !self.set_phase(host, Phase::Failed, now) {
            self.hosts.insert(
                host.to_owned(),
                Slot {
                    wave: self.wave,
                    phase: Phase::Failed,
                    since: now,
                    lease_until: None,
                    from: None,
                    error: None,
                },
            );
        }
        if let Some(slot) = self.hosts.get_mut(host) {
            slot.error = Some(error.to_owned());
        }
        self.failures += 1;
        let max = self.plan().max_failures;
        if self.state == State::Active && self.failures >= max {
            self.state = State::Halted;
            self.reason = Some(format!(
                "{} of {max} allowed failures; last on {host}: {error}",
                self.failures
            ));
            return true;
        }
        false
    }
}

/// A lease as a signed duration.
fn lease_of(plan: &Plan) -> SignedDuration {
    SignedDuration::try_from(plan.lease).unwrap_or(SignedDuration::from_secs(60))
}

/// The storage's clock, as seen from this host: the local clock plus an
/// offset measured by writing a record and reading back when the storage
/// says it was written. Measured again every [`BucketClock::RECALIBRATE`].
#[derive(Debug, Default)]
pub struct BucketClock {
    offset: std::sync::Mutex<Option<(SignedDuration, std::time::Instant)>>,
}

impl BucketClock {
    /// How long a measured offset is trusted.
    pub const RECALIBRATE: Duration = Duration::from_secs(300);

    /// The storage's time now, by the last measurement (the local clock
    /// when there was none).
    pub fn now(&self) -> Timestamp {
        let offset = self
            .offset
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .map(|(o, _)| o)
            .unwrap_or_default();
        Timestamp::now() + offset
    }

    /// Whether a measurement is due.
    pub fn due(&self) -> bool {
        self.offset
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_none_or(|(_, at)| at.elapsed() >= Self::RECALIBRATE)
    }

    /// The offset measured last, if any.
    pub fn offset(&self) -> Option<SignedDuration> {
        self.offset
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .map(|(o, _)| o)
    }

    /// Measures the offset: `write` writes `key` (between the two local
    /// readings), then the storage says when it wrote it. Storages that
    /// keep whole seconds (S3's Last-Modified) are read as the middle of
    /// that second.
    pub async fn calibrate<F>(&self, cache: &dyn Cache, key: &Key, write: F) -> Result<SignedDuration, Error>
    where
        F: std::future::Future<Output = Result<(), Error>>,
    {
        let before = Timestamp::now();
        write.await?;
        let after = Timestamp::now();
        let Some(at) = cache.written_at(key).await.map_err(Error::Cache)? else {
            return Err(Error::Rollout {
                reason: format!("the cache does not say when it wrote `{key}`"),
            });
        };
        let mut at = Timestamp::try_from(at).map_err(|e| Error::Rollout {
            reason: format!("the cache's time for `{key}` is out of range: {e}"),
        })?;
        if at.subsec_nanosecond() == 0 {
            at += SignedDuration::from_millis(500);
        }
        let local = before + after.duration_since(before) / 2;
        let offset = at.duration_since(local);
        *self.offset.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((offset, std::time::Instant::now()));
        Ok(offset)
    }
}

/// Most attempts of one compare-and-swap before giving up for this tick.
const CAS_ATTEMPTS: u32 = 12;

/// Reads the record under `key` (`None` when absent); a record that is not
/// valid JSON is an error naming the key.
pub async fn read(cache: &dyn Cache, key: &Key) -> Result<Option<(Record, String)>, Error> {
    let Some(v) = cache.read_versioned(key).await.map_err(Error::Cache)? else {
        return Ok(None);
    };
    let record = serde_json::from_slice(&v.data).map_err(|e| Error::Rollout {
        reason: format!("the rollout record `{key}` is malformed: {e}"),
    })?;
    Ok(Some((record, v.version)))
}

/// Changes the record under `key` by compare-and-swap: `change` gets the
/// record (`None` when absent) and says whether it changed it; conflicts
/// with other writers are retried with jitter. Returns `change`'s answer
/// and the record as written (or as read, when unchanged).
pub async fn update<T>(
    cache: &dyn Cache,
    key: &Key,
    host: &str,
    clock: &BucketClock,
    mut change: impl FnMut(&mut Option<Record>, Timestamp) -> (bool, T),
) -> Result<(T, Option<Record>), Error> {
    for attempt in 0..CAS_ATTEMPTS {
        let current = read(cache, key).await?;
        let version = current.as_ref().map(|(_, v)| v.clone());
        let mut record = current.map(|(r, _)| r);
        let now = clock.now();
        let (changed, answer) = change(&mut record, now);
        let Some(new) = record.as_mut().filter(|_| changed) else {
            return Ok((answer, record));
        };
        new.updated_by = host.to_owned();
        new.updated_at = now;
        let data = serde_json::to_vec_pretty(new).map_err(|e| Error::Rollout {
            reason: format!("cannot encode the rollout record: {e}"),
        })?;
        match cache.write_if(key, &data, version.as_deref()).await {
            Ok(_) => return Ok((answer, record)),
            Err(dewy_cache::Error::Conflict { .. }) => {
                let jitter = 5 + rand::random::<u64>() % (20 << attempt.min(5));
                tracing::debug!(key = %key, attempt, "Rollout record changed by another host; retrying");
                tokio::time::sleep(Duration::from_millis(jitter)).await;
            }
            Err(e) => return Err(Error::Cache(e)),
        }
    }
    Err(Error::Rollout {
        reason: format!("`{key}` kept changing under {CAS_ATTEMPTS} attempts to update it"),
    })
}

/// Every rollout record in the cache, newest first.
pub async fn list(cache: &dyn Cache) -> Result<Vec<Record>, Error> {
    let mut out = Vec::new();
    for entry in cache.list().await.map_err(Error::Cache)? {
        if entry.key.is_rollout_record()
            && let Some((record, _)) = read(cache, &entry.key).await?
        {
            out.push(record);
        }
    }
    out.sort_by_key(|r| std::cmp::Reverse(r.created_at));
    Ok(out)
}

/// An operator's command on a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// No host starts the release until resumed.
    Pause,
    /// Hosts join waves again.
    Resume,
    /// No host starts the release; hosts that took it go back.
    Abort,
}

/// Applies an operator's command to the rollout of `artifact` (its key),
/// by compare-and-swap, from any host or none (`who` names the operator).
pub async fn control(cache: &dyn Cache, artifact: &Key, command: Command, who: &str) -> Result<Record, Error> {
    let clock = BucketClock::default();
    let key = Key::rollout(artifact);
    let (result, record) = update(cache, &key, who, &clock, |record, _now| {
        let Some(r) = record else {
            return (false, Err(format!("no rollout record for `{artifact}`")));
        };
        let (from, to) = match command {
            Command::Pause => (&[State::Active][..], State::Paused),
            Command::Resume => (&[State::Paused][..], State::Active),
            Command::Abort => (&[State::Active, State::Paused, State::Halted][..], State::Aborted),
        };
        if r.state == to {
            return (false, Ok(()));
        }
        if r.state == State::Complete {
            return (
                false,
                Err(format!(
                    "the rollout of `{}` is complete: publish a newer release, or roll back on the hosts (`dewy rollback`)",
                    r.release
                )),
            );
        }
        if !from.contains(&r.state) {
            return (false, Err(format!("the rollout of `{}` is {}", r.release, r.state.as_str())));
        }
        r.state = to;
        r.reason = match command {
            Command::Resume => None,
            Command::Pause => Some(format!("paused by {who}")),
            Command::Abort => Some(format!("aborted by {who}")),
        };
        (true, Ok(()))
    })
    .await?;
    result.map_err(|reason| Error::Rollout { reason })?;
    record.ok_or_else(|| Error::Rollout {
        reason: format!("no rollout record for `{artifact}`"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn record(plan: &str) -> Record {
        let plan: Plan = plan.parse().unwrap();
        Record::new("v2", &Key::new("v2--app.tgz").unwrap(), &plan, "h0", t(0))
    }

    #[test]
    fn plans_parse_and_print() {
        let plan: Plan = "canary=2,bake=10s,max-parallel=25%,max-failures=3,auto-revert,lease=30s"
            .parse()
            .unwrap();
        assert_eq!(plan.canary, Count::Hosts(2));
        assert_eq!(plan.max_parallel, Count::Percent(25));
        assert_eq!(plan.bake, Duration::from_secs(10));
        assert!(plan.auto_revert);
        assert_eq!(plan.to_string().parse::<Plan>().unwrap(), plan);
        assert_eq!("".parse::<Plan>().unwrap(), Plan::default());
        for (bad, says) in [
            ("canary=0", "canary=0"),
            ("max-parallel=150%", "max-parallel=150%"),
            ("bake=soon", "bake=soon"),
            ("waves=3", "unknown rollout option `waves`"),
            ("lease=1s", "at least 5s"),
            ("auto-revert=maybe", "auto-revert=maybe"),
        ] {
            let err = bad.parse::<Plan>().unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
        assert_eq!(Count::Percent(25).of(10), 3);
        assert_eq!(Count::Percent(25).of(1), 1);
        assert_eq!(Count::Hosts(3).of(1), 3);
    }

    #[test]
    fn canary_then_waves_never_over_capacity() {
        let mut r = record("canary=1,bake=10s,max-parallel=2");
        let fleet = 5;
        assert_eq!(r.admit("a", fleet, Some("v1".into()), t(1)), Admission::Go { wave: 0 });
        assert!(matches!(r.admit("b", fleet, None, t(1)), Admission::Wait(w) if w.contains("wave 0 is full")));
        r.set_phase("a", Phase::Baking, t(2));
        assert!(matches!(r.admit("b", fleet, None, t(3)), Admission::Wait(_)));
        r.set_phase("a", Phase::Done, t(12));
        assert_eq!(r.admit("b", fleet, None, t(13)), Admission::Go { wave: 1 });
        assert_eq!(r.admit("c", fleet, None, t(13)), Admission::Go { wave: 1 });
        assert!(matches!(r.admit("d", fleet, None, t(13)), Admission::Wait(_)));
        // A slot already held is kept (a retry).
        assert_eq!(r.admit("b", fleet, None, t(14)), Admission::Go { wave: 1 });
        r.set_phase("b", Phase::Done, t(20));
        assert!(matches!(r.admit("d", fleet, None, t(20)), Admission::Wait(_)));
        r.set_phase("c", Phase::Done, t(20));
        assert_eq!(r.admit("d", fleet, None, t(21)), Admission::Go { wave: 2 });
        assert_eq!(r.counts()["done"], 3);
    }

    #[test]
    fn failures_halt_and_expired_leases_free_slots() {
        let mut r = record("canary=1,max-failures=2,lease=30s");
        assert_eq!(r.admit("a", 4, None, t(0)), Admission::Go { wave: 0 });
        // a dies: its slot expires by the storage clock, b takes it.
        assert!(r.expire(t(20)).is_empty());
        assert_eq!(r.expire(t(31)), vec!["a".to_owned()]);
        assert_eq!(r.admit("b", 4, None, t(31)), Admission::Go { wave: 0 });
        assert!(!r.fail("b", "health check failed", t(32)));
        assert!(matches!(r.admit("b", 4, None, t(33)), Admission::Stopped(s) if s.contains("health check failed")));
        // A failed host does not hold the wave: c tries, fails, halts it.
        assert_eq!(r.admit("c", 4, None, t(33)), Admission::Go { wave: 0 });
        assert!(r.fail("c", "did not start", t(34)));
        assert_eq!(r.state, State::Halted);
        assert!(
            r.reason
                .as_deref()
                .unwrap()
                .contains("2 of 2 allowed failures; last on c")
        );
        assert!(matches!(r.admit("d", 4, None, t(35)), Admission::Stopped(s) if s.contains("halted")));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_hosts_take_only_the_slots_there_are() {
        let cache: std::sync::Arc<dyn Cache> = std::sync::Arc::new(dewy_cache::MemoryCache::new());
        let artifact = Key::new("v2--app.tgz").unwrap();
        let key = Key::rollout(&artifact);
        let plan: Plan = "canary=3".parse().unwrap();
        let mut tasks = Vec::new();
        for i in 0..10 {
            let (cache, key, artifact, plan) = (cache.clone(), key.clone(), artifact.clone(), plan.clone());
            tasks.push(tokio::spawn(async move {
                let host = format!("h{i}");
                let clock = BucketClock::default();
                update(cache.as_ref(), &key, &host, &clock, |record, now| {
                    let r = record.get_or_insert_with(|| Record::new("v2", &artifact, &plan, &host, now));
                    let admission = r.admit(&host, 10, None, now);
                    (matches!(admission, Admission::Go { .. }), admission)
                })
                .await
                .unwrap()
                .0
            }));
        }
        let mut went = 0;
        for task in tasks {
            if matches!(task.await.unwrap(), Admission::Go { .. }) {
                went += 1;
            }
        }
        assert_eq!(went, 3);
        let (record, _) = read(cache.as_ref(), &key).await.unwrap().unwrap();
        assert_eq!(record.hosts.len(), 3);
    }

    #[tokio::test]
    async fn operators_pause_resume_and_abort() {
        let cache = dewy_cache::MemoryCache::new();
        let artifact = Key::new("v2--app.tgz").unwrap();
        let err = control(&cache, &artifact, Command::Pause, "ops").await.unwrap_err();
        assert!(err.to_string().contains("no rollout record for `v2--app.tgz`"), "{err}");
        let clock = BucketClock::default();
        update(&cache, &Key::rollout(&artifact), "h0", &clock, |r, now| {
            *r = Some(Record::new("v2", &artifact, &Plan::default(), "h0", now));
            (true, ())
        })
        .await
        .unwrap();
        let r = control(&cache, &artifact, Command::Pause, "ops@bastion").await.unwrap();
        assert_eq!(
            (r.state, r.reason.as_deref()),
            (State::Paused, Some("paused by ops@bastion"))
        );
        assert_eq!(
            control(&cache, &artifact, Command::Resume, "ops").await.unwrap().state,
            State::Active
        );
        assert_eq!(
            control(&cache, &artifact, Command::Abort, "ops").await.unwrap().state,
            State::Aborted
        );
        let err = control(&cache, &artifact, Command::Resume, "ops").await.unwrap_err();
        assert!(err.to_string().contains("is aborted"), "{err}");
    }
}

/// How long a count of the live fleet is used.
const FLEET_RECOUNT: Duration = Duration::from_secs(30);

/// This host's view of the rollout it takes part in (in memory).
#[derive(Debug, Default)]
pub struct Local {
    /// The record as last read or written (status, metrics).
    pub last: Option<Record>,
    /// The artifact key of a rollout this host finished and found complete:
    /// it no longer reads that record every tick.
    settled: Option<String>,
    /// Crashes of the app counted when this host's bake began.
    crashes_at_bake: Option<u64>,
    /// The last wait or stop reason logged at INFO.
    said: Option<String>,
    /// The live fleet's size and when it was counted.
    fleet: Option<(usize, std::time::Instant)>,
    /// A release this host will never deploy (its rollout halted or
    /// aborted, or it failed here) and why: its record is not read again.
    stopped: Option<(String, String)>,
}

impl crate::Deployer {
    /// The storage's time now; the offset to it is measured (by writing
    /// this host's heartbeat and reading back when the storage wrote it)
    /// when due.
    pub(crate) async fn storage_now(&self) -> Timestamp {
        if self.storage_clock.due()
            && let Ok(key) = Key::host(&self.config.hostname)
        {
            let record = self.heartbeat_record().await;
            let write = async { self.cache.write(&key, record.as_bytes()).await.map_err(Error::Cache) };
            match self.storage_clock.calibrate(self.cache.as_ref(), &key, write).await {
                Ok(offset) => tracing::debug!(offset_ms = offset.as_millis(), "Measured the storage clock"),
                Err(err) => {
                    tracing::warn!(error = %crate::chain(&err), "Could not measure the storage's clock; using this host's")
                }
            }
        }
        self.storage_clock.now()
    }

    /// Live hosts (heartbeats not stale), at least this one; counted again
    /// after [`FLEET_RECOUNT`] (a count reads every heartbeat).
    async fn live_fleet(&self) -> usize {
        if let Some((n, at)) = self
            .rollout
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .fleet
            && at.elapsed() < FLEET_RECOUNT
        {
            return n;
        }
        let live = self.fleet().await.iter().filter(|h| h["stale"] != true).count().max(1);
        self.rollout
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .fleet = Some((live, std::time::Instant::now()));
        live
    }

    fn remember(&self, record: Option<&Record>) {
        if let Some(r) = record {
            self.rollout
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .last = Some(r.clone());
        }
    }

    /// Asks the deploy loop to check again after `after` when that comes
    /// before the next interval. A moment already past asks for nothing
    /// (the interval applies: no busy loop while a bake is overdue).
    fn wake_in(&self, after: SignedDuration) {
        let Ok(after) = Duration::try_from(after) else { return };
        if after.is_zero() {
            return;
        }
        let at = tokio::time::Instant::now() + after;
        let mut state = self.state();
        state.wake_at = Some(state.wake_at.map_or(at, |t| t.min(at)));
    }

    /// Says once at INFO why this host waits (DEBUG after that).
    fn say(&self, release: &str, reason: &str, stopped: bool) {
        let line = format!("{release}: {reason}");
        let first = {
            let mut local = self.rollout.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let first = local.said.as_deref() != Some(line.as_str());
            local.said = Some(line);
            first
        };
        match (first, stopped) {
            (true, false) => tracing::info!(version = release, reason, "Rollout: waiting for a slot"),
            (true, true) => tracing::info!(
                version = release,
                reason,
                "Rollout: this host will not deploy this release"
            ),
            _ => tracing::debug!(version = release, reason, "Rollout: not deploying"),
        }
    }

    /// Why this host will never deploy `artifact`, when its rollout said so
    /// (kept in memory: the record is not read again).
    pub(crate) fn rollout_stopped(&self, artifact: &Key) -> Option<String> {
        let local = self.rollout.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        local
            .stopped
            .as_ref()
            .filter(|(stopped, _)| stopped == artifact.as_str())
            .map(|(_, reason)| reason.clone())
    }

    /// Before a deploy: creates the release's rollout record if this host
    /// is the first to see it, then asks it for a slot.
    pub(crate) async fn rollout_admit(
        &self,
        release: &dewy_registry::Release,
        artifact: &Key,
        from: Option<String>,
    ) -> Result<Admission, Error> {
        if let Some(reason) = self.rollout_stopped(artifact) {
            return Ok(Admission::Stopped(reason));
        }
        let plan = self.config.rollout.clone().unwrap_or_default();
        let key = Key::rollout(artifact);
        let host = self.config.hostname.clone();
        let fleet = self.live_fleet().await;
        self.storage_now().await;
        let (admission, record) = update(self.cache.as_ref(), &key, &host, &self.storage_clock, |record, now| {
            let created = record.is_none();
            let r = record.get_or_insert_with(|| Record::new(&release.tag, artifact, &plan, &host, now));
            let expired = r.expire(now);
            let admission = r.admit(&host, fleet, from.clone(), now);
            let changed = created || !expired.is_empty() || matches!(admission, Admission::Go { .. });
            let opens_in = r.wave_opens_at(now).map(|t| t.duration_since(now));
            (changed, (admission, created, expired, opens_in))
        })
        .await?;
        self.remember(record.as_ref());
        let (admission, created, expired, opens_in) = admission;
        if let (Admission::Wait(_), Some(opens_in)) = (&admission, opens_in) {
            // Look again just after the wave's last bake ends (the baking
            // host marks itself done then); when that is just past (clocks
            // read to the second), soon; when long past (a host that stopped
            // renewing), at the interval.
            let at = opens_in + SignedDuration::from_millis(100);
            if at.is_positive() {
                self.wake_in(at);
            } else if at > SignedDuration::from_secs(-3) {
                self.wake_in(SignedDuration::from_millis(200));
            }
        }
        if created {
            tracing::info!(version = %release.tag, plan = %plan, fleet, "Rollout started");
        }
        for gone in expired {
            tracing::warn!(version = %release.tag, host = %gone, "Rollout: a slot's lease ran out (its host stopped renewing it); freed");
        }
        match &admission {
            Admission::Go { wave } => {
                tracing::info!(version = %release.tag, wave, fleet, "Rollout: slot taken; deploying");
                self.rollout
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .said = None;
            }
            Admission::Wait(reason) => self.say(&release.tag, reason, false),
            Admission::Stopped(reason) => {
                self.say(&release.tag, reason, true);
                self.rollout
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .stopped = Some((artifact.to_string(), reason.clone()));
            }
        }
        Ok(admission)
    }

    /// Renews this host's slot while its deploy runs.
    pub(crate) async fn rollout_renew(&self, artifact: &Key) {
        let host = self.config.hostname.clone();
        let result = update(
            self.cache.as_ref(),
            &Key::rollout(artifact),
            &host,
            &self.storage_clock,
            |record, now| {
                let lease = record.as_ref().map(|r| lease_of(&r.plan())).unwrap_or_default();
                match record.as_mut().and_then(|r| r.hosts.get_mut(&host)) {
                    Some(slot) if slot.phase.leased() => {
                        slot.lease_until = Some(now + lease);
                        (true, ())
                    }
                    _ => (false, ()),
                }
            },
        )
        .await;
        if let Err(err) = result {
            tracing::warn!(error = %crate::chain(&err), "Rollout: could not renew this host's slot");
        }
    }

    /// After a deploy: baking (the bake time starts), or failed (which may
    /// halt the rollout). A deploy that failed for another reason (the
    /// download, an operator's pin) keeps the slot for the next tick.
    pub(crate) async fn rollout_after_deploy(&self, artifact: &Key, result: &Result<std::path::PathBuf, Error>) {
        let host = self.config.hostname.clone();
        let failure = match result {
            Ok(_) => None,
            Err(err) if err.blames_release() => Some(crate::chain(err)),
            Err(_) => return,
        };
        if failure.is_none() {
            let crashes = self.metrics.app_crashes.load(std::sync::atomic::Ordering::Relaxed);
            self.rollout
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .crashes_at_bake = Some(crashes);
        }
        let outcome = update(
            self.cache.as_ref(),
            &Key::rollout(artifact),
            &host,
            &self.storage_clock,
            |record, now| {
                let Some(r) = record.as_mut() else {
                    return (false, false);
                };
                match &failure {
                    Some(error) => {
                        let halted = r.fail(&host, error, now);
                        (true, halted)
                    }
                    None => (r.set_phase(&host, Phase::Baking, now), false),
                }
            },
        )
        .await;
        match outcome {
            Ok((halted, record)) => {
                self.remember(record.as_ref());
                let Some(r) = record else { return };
                if let Some(error) = &failure {
                    tracing::warn!(version = %r.release, failures = r.failures, error = %error, "Rollout: this host's deploy failed; counted against the rollout");
                }
                if halted {
                    let reason = r.reason.clone().unwrap_or_default();
                    tracing::error!(version = %r.release, reason = %reason, "Rollout halted");
                    self.notify
                        .send_error(format!("Rollout of `{}` halted: {reason}", r.release));
                } else if failure.is_none() {
                    let bake = r.plan().bake;
                    tracing::info!(version = %r.release, bake = %humantime::format_duration(bake), "Rollout: deployed; baking");
                    self.wake_in(SignedDuration::try_from(bake).unwrap_or_default());
                }
            }
            Err(err) => tracing::warn!(error = %crate::chain(&err), "Rollout: could not record this host's deploy"),
        }
    }

    /// Each tick while `release` is in place: finish the bake (or fail it
    /// when the app crashed meanwhile), renew the lease, join the record
    /// when this host runs the release without a slot, and go back to the
    /// previous release when the rollout was halted (with auto-revert) or
    /// aborted. Once the rollout is complete, the record is not read again.
    pub(crate) async fn rollout_in_place(&self, release: &dewy_registry::Release, artifact: &Key) -> Result<(), Error> {
        if self
            .rollout
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .settled
            .as_deref()
            == Some(artifact.as_str())
        {
            return Ok(());
        }
        let host = self.config.hostname.clone();
        let healthy = self.app.as_ref().is_none_or(|a| a.is_running() && !a.is_restarting());
        let crashes = self.metrics.app_crashes.load(std::sync::atomic::Ordering::Relaxed);
        let crashed = {
            let mut local = self.rollout.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let at = *local.crashes_at_bake.get_or_insert(crashes);
            crashes > at
        };
        let fleet = self.live_fleet().await;
        self.storage_now().await;
        #[derive(Debug, PartialEq)]
        enum Step {
            Nothing,
            Baked,
            Failed(bool),
            Revert(Option<String>),
            Complete,
        }
        let mut bake_left = None;
        let (step, record) = update(
            self.cache.as_ref(),
            &Key::rollout(artifact),
            &host,
            &self.storage_clock,
            |record, now| {
                bake_left = None;
                let Some(r) = record.as_mut() else {
                    return (false, Step::Complete);
                };
                let plan = r.plan();
                let stopped = matches!(r.state, State::Aborted) || (r.state == State::Halted && plan.auto_revert);
                let wave = r.wave;
                let slot = r.hosts.entry(host.clone()).or_insert_with(|| Slot {
                    // Running the release without a slot (it lost the slot
                    // while down, or deployed before the record existed):
                    // it bakes like the others.
                    wave,
                    phase: Phase::Baking,
                    since: now,
                    lease_until: Some(now + lease_of(&plan)),
                    from: None,
                    error: None,
                });
                match slot.phase {
                    Phase::Deploying | Phase::Baking | Phase::Done if stopped => {
                        slot.phase = Phase::Reverted;
                        slot.since = now;
                        slot.lease_until = None;
                        (true, Step::Revert(slot.from.clone()))
                    }
                    Phase::Deploying | Phase::Baking if crashed => {
                        let halted = r.fail(&host, "the application crashed while baking", now);
                        (true, Step::Failed(halted))
                    }
                    Phase::Deploying | Phase::Baking => {
                        let baked = SignedDuration::try_from(plan.bake).unwrap_or_default();
                        if healthy && now.duration_since(slot.since) >= baked && slot.phase == Phase::Baking {
                            slot.phase = Phase::Done;
                            slot.since = now;
                            slot.lease_until = None;
                            (true, Step::Baked)
                        } else {
                            if slot.phase == Phase::Baking {
                                bake_left = Some(baked - now.duration_since(slot.since));
                            }
                            let lease = lease_of(&plan);
                            // Renewed once a third of the lease is gone.
                            let due = slot.lease_until.is_none_or(|t| t.duration_since(now) < lease * 2 / 3);
                            slot.phase = Phase::Baking;
                            if due {
                                slot.lease_until = Some(now + lease);
                            }
                            (due, Step::Nothing)
                        }
                    }
                    Phase::Done => {
                        let done = r.hosts.values().filter(|s| s.phase == Phase::Done).count();
                        match r.state {
                            State::Complete => (false, Step::Complete),
                            State::Active if done >= fleet => {
                                r.state = State::Complete;
                                (true, Step::Complete)
                            }
                            _ => (false, Step::Nothing),
                        }
                    }
                    Phase::Failed | Phase::Reverted => (false, Step::Nothing),
                }
            },
        )
        .await?;
        self.remember(record.as_ref());
        if let Some(left) = bake_left {
            self.wake_in(left);
        }
        match step {
            Step::Nothing => {}
            Step::Baked => {
                tracing::info!(version = %release.tag, "Rollout: baked; this host is done");
            }
            Step::Complete => {
                if record
                    .as_ref()
                    .is_some_and(|r| r.updated_by == host && r.state == State::Complete)
                {
                    tracing::info!(version = %release.tag, "Rollout complete: every live host runs it");
                }
                tracing::debug!(version = %release.tag, "Rollout complete; its record is no longer read here");
                self.rollout
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .settled = Some(artifact.to_string());
            }
            Step::Failed(halted) => {
                tracing::error!(version = %release.tag, "Rollout: the application crashed while baking; counted against the rollout");
                if halted {
                    self.notify.send_error(format!(
                        "Rollout of `{}` halted: {}",
                        release.tag,
                        record.as_ref().and_then(|r| r.reason.clone()).unwrap_or_default()
                    ));
                }
                let from = record
                    .as_ref()
                    .and_then(|r| r.hosts.get(&host))
                    .and_then(|s| s.from.clone());
                self.revert(&release.tag, from.as_deref(), "crashed while baking").await;
            }
            Step::Revert(from) => {
                let reason = record
                    .as_ref()
                    .map(|r| format!("rollout {}", r.state.as_str()))
                    .unwrap_or_default();
                self.revert(&release.tag, from.as_deref(), &reason).await;
            }
        }
        Ok(())
    }

    /// Goes back from `tag` to the release `from` still on disk (no pin:
    /// the rollout's state keeps this host off `tag`).
    async fn revert(&self, tag: &str, from: Option<&str>, reason: &str) {
        let Some(from) = from else {
            tracing::warn!(
                version = tag,
                reason,
                "Rollout: nothing ran here before this release; it stays"
            );
            return;
        };
        let Some(dir) = crate::history::folder_of(&self.config.root, from) else {
            tracing::error!(
                version = tag,
                to = from,
                reason,
                "Rollout: cannot revert, the previous release is no longer on disk"
            );
            return;
        };
        match self.switch_and_restart(&dir, from).await {
            Ok(()) => {
                tracing::warn!(
                    version = tag,
                    to = from,
                    reason,
                    "Rollout: reverted to the previous release"
                );
                self.record_operator_action(from, "rolled-back", Some(&dir), &format!("rollout: {reason}"));
                self.notify
                    .send_important(format!("Reverted `{tag}` to `{from}` ({reason})"));
            }
            Err(err) => {
                tracing::error!(version = tag, to = from, error = %crate::chain(&err), "Rollout: reverting failed");
            }
        }
    }

    /// The rollout records in the cache, newest first (for the admin API).
    pub async fn rollouts(&self) -> Result<Vec<Record>, Error> {
        list(self.cache.as_ref()).await
    }

    /// The rollout this host last read or wrote.
    pub fn rollout_seen(&self) -> Option<Record> {
        self.rollout
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .last
            .clone()
    }
}
