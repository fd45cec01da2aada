//! The test run of `scripts/test.sh`: runs the test executables of one
//! `cargo test --no-run` build side by side and records where the time goes.
//!
//! Every test of this crate's integration binaries runs in a process of its
//! own, so that the long ones (a control plane, a VM) can run beside each
//! other and each gets a wall time; every other test executable runs whole.
//! A row per phase, per binary and per test lands in a times file, which
//! `table` prints.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::Deserialize;

/// The package whose integration tests run one test per process.
const SPLIT_PACKAGE: &str = "lvmlocal-tests";

/// One test executable of the build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Executable {
    /// `package/target` with the target's kind when it is not an
    /// integration test, e.g. `lvmlocal-proto/lib`, `lvmlocal-tests/cluster`.
    pub label: String,
    pub path: PathBuf,
    /// Whether each of its tests runs in a process of its own.
    pub split: bool,
}

#[derive(Deserialize)]
struct Message {
    reason: String,
    #[serde(default)]
    package_id: String,
    target: Option<Target>,
    profile: Option<Profile>,
    executable: Option<PathBuf>,
}

#[derive(Deserialize)]
struct Target {
    name: String,
    kind: Vec<String>,
}

#[derive(Deserialize)]
struct Profile {
    test: bool,
}

/// The test executables in `cargo test --no-run --message-format=json`.
pub fn executables(cargo_json: &str) -> anyhow::Result<Vec<Executable>> {
    let mut found = Vec::new();
    for line in cargo_json.lines().filter(|l| l.starts_with('{')) {
        let message: Message =
            serde_json::from_str(line).with_context(|| format!("reading cargo's line {line}"))?;
        let (Some(target), Some(profile), Some(path)) =
            (message.target, message.profile, message.executable)
        else {
            continue;
        };
        if message.reason != "compiler-artifact" || !profile.test {
            continue;
        }
        let package = package_name(&message.package_id);
        let kind = target.kind.first().map(String::as_str).unwrap_or("");
        let label = if kind == "test" {
            format!("{package}/{}", target.name)
        } else if kind == "lib" || target.name.replace('-', "_") == package.replace('-', "_") {
            format!("{package}/{kind}")
        } else {
            format!("{package}/{kind}/{}", target.name)
        };
        found.push(Executable {
            label,
            path,
            split: package == SPLIT_PACKAGE && kind == "test",
        });
    }
    found.sort_by(|a, b| a.label.cmp(&b.label));
    found.dedup_by(|a, b| a.path == b.path);
    Ok(found)
}

/// The package name in a package id of either form cargo writes:
/// `path+file:///…/proto#lvmlocal-proto@0.1.0` or `name 0.1.0 (path+…)`.
fn package_name(id: &str) -> String {
    if let Some((_, rest)) = id.rsplit_once('#') {
        let name = rest.split('@').next().unwrap_or(rest);
        // `…/proto#0.1.0` when the directory is named as the package.
        if name.chars().next().is_some_and(|c| c.is_ascii_digit()) {
            let dir = id.rsplit_once('#').map_or(id, |(path, _)| path);
            return dir.rsplit('/').next().unwrap_or(dir).to_string();
        }
        return name.to_string();
    }
    id.split(' ').next().unwrap_or(id).to_string()
}

/// The tests of `executable`, as it lists them.
pub fn list(executable: &Executable) -> anyhow::Result<Vec<String>> {
    let out = Command::new(&executable.path)
        .args(["--list", "--format", "terse"])
        .output()
        .with_context(|| format!("listing the tests of {}", executable.path.display()))?;
    if !out.status.success() {
        bail!(
            "{} --list: {}\n{}",
            executable.path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(parse_list(&String::from_utf8_lossy(&out.stdout)))
}

/// The tests `--list --format terse` names.
pub fn parse_list(listing: &str) -> Vec<String> {
    listing
        .lines()
        .filter_map(|line| line.strip_suffix(": test"))
        .map(str::to_string)
        .collect()
}

/// What libtest's `test result:` lines add up to.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl Counts {
    pub fn add(&mut self, other: Counts) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.ignored += other.ignored;
    }
}

/// Sums every `test result: …. N passed; N failed; N ignored; …` line.
/// `None` when there is none: the process ended before libtest finished.
pub fn parse_results(output: &str) -> Option<Counts> {
    let mut total: Option<Counts> = None;
    for line in output.lines() {
        let Some(rest) = line.strip_prefix("test result: ") else {
            continue;
        };
        let mut counts = Counts::default();
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(number)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(number) = number.parse::<u64>() else {
                continue;
            };
            match what {
                "passed" => counts.passed = number,
                "failed" => counts.failed = number,
                "ignored" => counts.ignored = number,
                _ => {}
            }
        }
        total.get_or_insert_with(Counts::default).add(counts);
    }
    total
}

/// One process of the run: a whole executable, or one test of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    pub executable: Executable,
    pub test: Option<String>,
    /// Started before the others and held to `heavy_jobs` at once.
    pub heavy: bool,
}

impl Unit {
    pub fn name(&self) -> String {
        match &self.test {
            Some(test) => format!("{}::{test}", self.executable.label),
            None => self.executable.label.clone(),
        }
    }

    fn args(&self) -> Vec<String> {
        match &self.test {
            Some(test) => vec!["--exact".into(), test.clone(), "--test-threads=1".into()],
            None => Vec::new(),
        }
    }

    fn log_name(&self) -> String {
        self.name().replace(['/', ':'], "_")
    }
}

/// The units of `executables`, heavy ones first, in their listing's order:
/// a test of an executable whose label ends with one of `heavy` is heavy.
pub fn plan(
    executables: &[Executable],
    heavy: &[String],
    list: impl Fn(&Executable) -> anyhow::Result<Vec<String>>,
) -> anyhow::Result<Vec<Unit>> {
    let mut units = Vec::new();
    for executable in executables {
        let is_heavy = heavy
            .iter()
            .any(|name| executable.label.ends_with(&format!("/{name}")));
        let tests: Vec<Option<String>> = if executable.split {
            list(executable)?.into_iter().map(Some).collect()
        } else {
            vec![None]
        };
        units.extend(tests.into_iter().map(|test| Unit {
            executable: executable.clone(),
            test,
            heavy: is_heavy,
        }));
    }
    units.sort_by_key(|unit| !unit.heavy);
    Ok(units)
}

/// How the units are run.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Processes at once.
    pub jobs: usize,
    /// Heavy processes at once.
    pub heavy_jobs: usize,
    /// A unit still running after this is killed, with its whole session.
    pub timeout: Duration,
}

/// What one unit did.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub unit: Unit,
    /// Seconds since the run's start.
    pub started: f64,
    pub took: f64,
    pub counts: Option<Counts>,
    pub success: bool,
    pub timed_out: bool,
}

impl Outcome {
    /// Passed: exited 0 and libtest counted at least one passed test and
    /// none failed (a filter that matches nothing also exits 0).
    pub fn passed(&self) -> bool {
        self.success
            && self
                .counts
                .is_some_and(|c| c.failed == 0 && (c.passed > 0 || self.unit.test.is_none()))
    }
}

impl Outcome {
    /// The line the run prints when this unit ends, `done` of `total`.
    pub fn line(&self, done: usize, total: usize) -> String {
        let verdict = if self.passed() {
            "ok"
        } else if self.timed_out {
            "TIMEOUT"
        } else {
            "FAILED"
        };
        let counts = self.counts.unwrap_or_default();
        let detail = if self.unit.test.is_none() {
            format!(" ({} passed, {} failed)", counts.passed, counts.failed)
        } else {
            String::new()
        };
        format!(
            "[{done:>3}/{total}] {verdict:<7} {:>6.1}s  {}{detail}",
            self.took,
            self.unit.name()
        )
    }
}

/// The run's closing count line, and whether every unit passed. A unit
/// that failed without a libtest count counts as one failed test.
pub fn closing(outcomes: &[Outcome]) -> (String, bool) {
    let mut counts = Counts::default();
    for outcome in outcomes {
        counts.add(outcome.counts.unwrap_or_default());
    }
    let broken = outcomes.iter().filter(|o| !o.passed()).count() as u64;
    let line = format!(
        "suite: {} passed, {} failed, {} skipped",
        counts.passed,
        counts.failed.max(broken),
        counts.ignored
    );
    (line, broken == 0)
}

struct Running {
    index: usize,
    child: Child,
    started: Instant,
    /// `started`, in seconds since the run's origin.
    offset: f64,
    log: PathBuf,
}

/// Runs `units`, at most `limits.jobs` at a time, each with its output in
/// `log_dir`; `report` is told of each as it ends. `origin` is the instant
/// offsets in the outcomes count from.
pub fn run(
    units: &[Unit],
    limits: &Limits,
    log_dir: &Path,
    origin: SystemTime,
    mut report: impl FnMut(&Outcome, &str),
) -> anyhow::Result<Vec<Outcome>> {
    fs::create_dir_all(log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    let mut waiting: Vec<usize> = (0..units.len()).collect();
    let mut running: Vec<Running> = Vec::new();
    let mut outcomes = Vec::new();
    while !waiting.is_empty() || !running.is_empty() {
        while running.len() < limits.jobs.max(1) {
            let heavy_now = running.iter().filter(|r| units[r.index].heavy).count();
            let Some(position) = waiting
                .iter()
                .position(|&i| !units[i].heavy || heavy_now < limits.heavy_jobs.max(1))
            else {
                break;
            };
            let index = waiting.remove(position);
            let offset = seconds_since(origin, SystemTime::now());
            running.push(start(&units[index], index, offset, log_dir)?);
        }
        std::thread::sleep(Duration::from_millis(100));
        let mut still = Vec::new();
        for mut job in running.drain(..) {
            let timed_out = job.started.elapsed() > limits.timeout;
            if timed_out {
                kill_session(job.child.id());
            }
            let status = match job.child.try_wait() {
                Ok(Some(status)) => status,
                Ok(None) if !timed_out => {
                    still.push(job);
                    continue;
                }
                Ok(None) => job.child.wait()?,
                Err(err) => return Err(err).context("waiting for a test process"),
            };
            // A test that left processes behind (a VM, a control plane in
            // process groups of their own) takes them with it.
            kill_session(job.child.id());
            let output = fs::read_to_string(&job.log).unwrap_or_default();
            let outcome = Outcome {
                unit: units[job.index].clone(),
                started: job.offset,
                took: job.started.elapsed().as_secs_f64(),
                counts: parse_results(&output),
                success: status.success() && !timed_out,
                timed_out,
            };
            report(&outcome, &output);
            outcomes.push(outcome);
        }
        running = still;
    }
    Ok(outcomes)
}

fn start(unit: &Unit, index: usize, offset: f64, log_dir: &Path) -> anyhow::Result<Running> {
    let log = log_dir.join(format!("{}.log", unit.log_name()));
    let out = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let child = Command::new(&unit.executable.path)
        .args(unit.args())
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn_in_session()
        .with_context(|| format!("starting {}", unit.executable.path.display()))?;
    Ok(Running {
        index,
        child,
        started: Instant::now(),
        offset,
        log,
    })
}

trait SpawnInSession {
    fn spawn_in_session(&mut self) -> std::io::Result<Child>;
}

impl SpawnInSession for Command {
    /// Spawns the command as the leader of a new session, which every
    /// process it starts stays in, whatever process group it makes.
    fn spawn_in_session(&mut self) -> std::io::Result<Child> {
        // SAFETY: setsid(2) is async-signal-safe and touches no memory of
        // the parent.
        unsafe {
            self.pre_exec(|| {
                nix::unistd::setsid()
                    .map(drop)
                    .map_err(std::io::Error::from)
            });
        }
        self.spawn()
    }
}

/// SIGKILLs every process of the session `leader` leads.
fn kill_session(leader: u32) {
    let Ok(entries) = fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // After the command's closing parenthesis: state, ppid, pgrp, session.
        let session = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(3))
            .and_then(|field| field.parse::<u32>().ok());
        if session == Some(leader) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

fn seconds_since(origin: SystemTime, now: SystemTime) -> f64 {
    now.duration_since(origin).unwrap_or_default().as_secs_f64()
}

/// The run's start, from `LVMLOCAL_SUITE_START` (seconds since the epoch, as
/// `date +%s.%N` writes them), or now.
pub fn origin_from_env() -> SystemTime {
    std::env::var("LVMLOCAL_SUITE_START")
        .ok()
        .and_then(|text| text.parse::<f64>().ok())
        .map_or_else(SystemTime::now, |secs| {
            UNIX_EPOCH + Duration::from_secs_f64(secs)
        })
}

/// One row of the times file: `kind<TAB>name<TAB>from<TAB>took`, seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub kind: String,
    pub name: String,
    pub from: f64,
    pub took: f64,
}

pub fn parse_rows(text: &str) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split('\t').collect();
        let [kind, name, from, took] = fields[..] else {
            bail!("a times row needs four fields: {line:?}");
        };
        rows.push(Row {
            kind: kind.into(),
            name: name.into(),
            from: from.parse().with_context(|| format!("start of {line:?}"))?,
            took: took.parse().with_context(|| format!("time of {line:?}"))?,
        });
    }
    Ok(rows)
}

/// The rows of a run's outcomes: one per binary (its first start to its
/// last end) and one per test run alone.
pub fn rows_of(outcomes: &[Outcome]) -> Vec<Row> {
    let mut spans: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
    let mut rows = Vec::new();
    for outcome in outcomes {
        let end = outcome.started + outcome.took;
        let span = spans
            .entry(&outcome.unit.executable.label)
            .or_insert((outcome.started, end));
        span.0 = span.0.min(outcome.started);
        span.1 = span.1.max(end);
        if let Some(test) = &outcome.unit.test {
            rows.push(Row {
                kind: "test".into(),
                name: format!("{}::{test}", outcome.unit.executable.label),
                from: outcome.started,
                took: outcome.took,
            });
        }
    }
    let binaries = spans.into_iter().map(|(label, (from, end))| Row {
        kind: "binary".into(),
        name: label.into(),
        from,
        took: end - from,
    });
    binaries.chain(rows).collect()
}

pub fn append_rows(path: &Path, rows: &[Row]) -> anyhow::Result<()> {
    let mut file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    for row in rows {
        writeln!(
            file,
            "{}\t{}\t{:.1}\t{:.1}",
            row.kind, row.name, row.from, row.took
        )?;
    }
    Ok(())
}

/// The time table: every phase and binary in the order they started, then
/// the `slowest` longest tests.
pub fn table(rows: &[Row], slowest: usize) -> String {
    let clock = |secs: f64| {
        let secs = secs.max(0.0).round() as u64;
        format!("{:>3}:{:02}", secs / 60, secs % 60)
    };
    let mut out = format!(
        "{:<7} {:<78} {:>6} {:>6}\n",
        "", "where the time went", "from", "took"
    );
    let mut line = |what: &str, name: &str, from: f64, took: f64| {
        let _ = writeln!(out, "{what:<7} {name:<78} {} {}", clock(from), clock(took));
    };
    let mut main: Vec<&Row> = rows.iter().filter(|r| r.kind != "test").collect();
    main.sort_by(|a, b| a.from.total_cmp(&b.from));
    for row in main {
        line(&row.kind, &row.name, row.from, row.took);
    }
    let mut tests: Vec<&Row> = rows.iter().filter(|r| r.kind == "test").collect();
    tests.sort_by(|a, b| b.took.total_cmp(&a.took));
    for row in tests.into_iter().take(slowest) {
        line("slowest", &row.name, row.from, row.took);
    }
    if let Some(end) = rows
        .iter()
        .map(|r| r.from + r.took)
        .max_by(|a, b| a.total_cmp(b))
    {
        line("total", "", 0.0, end);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn artifact(package_id: &str, name: &str, kind: &str, test: bool, exe: Option<&str>) -> String {
        serde_json::json!({
            "reason": "compiler-artifact",
            "package_id": package_id,
            "target": {"name": name, "kind": [kind]},
            "profile": {"test": test},
            "executable": exe,
        })
        .to_string()
    }

    #[test]
    fn executables_are_the_test_artifacts_with_a_path() {
        let json = [
            artifact(
                "path+file:///w/proto#lvmlocal-proto@0.1.0",
                "lvmlocal_proto",
                "lib",
                true,
                Some("/t/proto-1"),
            ),
            artifact(
                "path+file:///w/proto#lvmlocal-proto@0.1.0",
                "lvmlocal_proto",
                "lib",
                false,
                None,
            ),
            artifact(
                "path+file:///w/tests#lvmlocal-tests@0.1.0",
                "cluster",
                "test",
                true,
                Some("/t/cluster-2"),
            ),
            artifact(
                "path+file:///w/csi-agent#0.1.0",
                "csi-agent",
                "bin",
                true,
                Some("/t/agent-3"),
            ),
            artifact(
                "path+file:///w/tests#lvmlocal-tests@0.1.0",
                "vmbed",
                "bin",
                true,
                Some("/t/vmbed-4"),
            ),
            artifact(
                "path+file:///w/tests#lvmlocal-tests@0.1.0",
                "vmbed",
                "bin",
                false,
                Some("/t/vmbed"),
            ),
            r#"{"reason":"build-finished","success":true}"#.to_string(),
            "   Compiling something".to_string(),
        ]
        .join("\n");
        let found = executables(&json).unwrap();
        let labels: Vec<(&str, bool)> = found.iter().map(|e| (e.label.as_str(), e.split)).collect();
        assert_eq!(
            labels,
            [
                ("csi-agent/bin", false),
                ("lvmlocal-proto/lib", false),
                ("lvmlocal-tests/bin/vmbed", false),
                ("lvmlocal-tests/cluster", true),
            ]
        );
    }

    #[test]
    fn package_names_of_both_id_forms() {
        assert_eq!(
            package_name("path+file:///w/proto#lvmlocal-proto@0.1.0"),
            "lvmlocal-proto"
        );
        assert_eq!(package_name("path+file:///w/csi-agent#0.1.0"), "csi-agent");
        assert_eq!(package_name("serde 1.0.1 (registry+https://x)"), "serde");
    }

    #[test]
    fn listing_keeps_tests_only() {
        let listing = "a::one: test\nb: test\nbench_x: benchmark\n\n";
        assert_eq!(parse_list(listing), ["a::one", "b"]);
    }

    #[test]
    fn results_add_up_and_their_absence_is_told() {
        let output = "running 2 tests\n\
            test result: ok. 2 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s\n\
            test result: FAILED. 3 passed; 1 failed; 0 ignored; 0 measured; 5 filtered out; finished in 1.00s\n";
        assert_eq!(
            parse_results(output),
            Some(Counts {
                passed: 5,
                failed: 1,
                ignored: 1
            })
        );
        assert_eq!(parse_results("thread 'main' panicked\n"), None);
    }

    fn exe(label: &str, split: bool) -> Executable {
        Executable {
            label: label.into(),
            path: PathBuf::from("/bin/true"),
            split,
        }
    }

    #[test]
    fn plan_splits_and_puts_heavy_first() {
        let executables = [
            exe("p/lib", false),
            exe("t/cluster", true),
            exe("t/deploy", true),
        ];
        let units = plan(&executables, &["cluster".into()], |e| {
            Ok(vec![format!("{}-a", e.label), format!("{}-b", e.label)])
        })
        .unwrap();
        let names: Vec<(String, bool)> = units.iter().map(|u| (u.name(), u.heavy)).collect();
        assert_eq!(
            names,
            [
                ("t/cluster::t/cluster-a".to_string(), true),
                ("t/cluster::t/cluster-b".to_string(), true),
                ("p/lib".to_string(), false),
                ("t/deploy::t/deploy-a".to_string(), false),
                ("t/deploy::t/deploy-b".to_string(), false),
            ]
        );
    }

    fn outcome(unit: Unit, success: bool, counts: Option<Counts>) -> Outcome {
        Outcome {
            unit,
            started: 0.0,
            took: 1.0,
            counts,
            success,
            timed_out: false,
        }
    }

    #[test]
    fn a_test_passes_only_when_it_ran() {
        let one = Unit {
            executable: exe("t/x", true),
            test: Some("a".into()),
            heavy: false,
        };
        let whole = Unit {
            executable: exe("p/lib", false),
            test: None,
            heavy: false,
        };
        let ran = Some(Counts {
            passed: 1,
            failed: 0,
            ignored: 0,
        });
        let none = Some(Counts::default());
        assert!(outcome(one.clone(), true, ran).passed());
        assert!(
            !outcome(one.clone(), true, none).passed(),
            "a filter that matched nothing"
        );
        assert!(!outcome(one.clone(), true, None).passed(), "no result line");
        assert!(!outcome(one, false, ran).passed());
        assert!(
            outcome(whole, true, none).passed(),
            "a binary with no tests"
        );
    }

    #[test]
    fn the_closing_line_counts_a_crashed_unit_as_failed() {
        let unit = Unit {
            executable: exe("t/x", true),
            test: Some("a".into()),
            heavy: false,
        };
        let ran = Some(Counts {
            passed: 1,
            failed: 0,
            ignored: 2,
        });
        let passing = outcome(unit.clone(), true, ran);
        assert_eq!(
            closing(std::slice::from_ref(&passing)),
            ("suite: 1 passed, 0 failed, 2 skipped".into(), true)
        );
        let crashed = outcome(unit, false, None);
        assert_eq!(
            closing(&[passing, crashed]),
            ("suite: 1 passed, 1 failed, 2 skipped".into(), false)
        );
    }

    #[test]
    fn units_run_side_by_side_within_their_limits() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("unit.sh");
        // Each unit notes how many run with it, then passes as libtest says.
        fs::write(
            &script,
            format!(
                "#!/bin/sh\nd={}\ntouch $d/run.$$\nsleep 0.3\nls $d | grep -c '^run' >> $d/seen\nrm $d/run.$$\n\
                 echo 'test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out'\n",
                dir.path().display()
            ),
        )
        .unwrap();
        fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let unit = |heavy| Unit {
            executable: Executable {
                label: "t/x".into(),
                path: script.clone(),
                split: true,
            },
            test: Some("a".into()),
            heavy,
        };
        let units = [unit(true), unit(true), unit(true), unit(false)];
        let limits = Limits {
            jobs: 3,
            heavy_jobs: 1,
            timeout: Duration::from_secs(30),
        };
        let mut told = 0;
        let outcomes = run(
            &units,
            &limits,
            &dir.path().join("logs"),
            SystemTime::now(),
            |_, _| told += 1,
        )
        .unwrap();
        assert_eq!(told, 4);
        assert!(outcomes.iter().all(Outcome::passed));
        let seen = fs::read_to_string(dir.path().join("seen")).unwrap();
        let most = seen
            .lines()
            .map(|l| l.trim().parse::<u32>().unwrap())
            .max()
            .unwrap();
        assert_eq!(most, 2, "one heavy unit and the light one at once: {seen}");
    }

    #[test]
    fn a_unit_past_its_time_is_killed_with_its_children_and_failed() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("hang.sh");
        let pid = dir.path().join("child.pid");
        // `set -m` puts the child in a process group of its own, as the
        // cluster harness does with its services.
        fs::write(
            &script,
            format!(
                "#!/bin/sh\nset -m\nsleep 60 &\necho $! > {}\nwait\n",
                pid.display()
            ),
        )
        .unwrap();
        fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let units = [Unit {
            executable: Executable {
                label: "t/x".into(),
                path: script,
                split: false,
            },
            test: None,
            heavy: false,
        }];
        let limits = Limits {
            jobs: 1,
            heavy_jobs: 1,
            timeout: Duration::from_millis(500),
        };
        let outcomes = run(&units, &limits, dir.path(), SystemTime::now(), |_, _| {}).unwrap();
        assert!(outcomes[0].timed_out && !outcomes[0].passed());
        let child = fs::read_to_string(&pid).unwrap();
        let child = child.trim();
        // SIGKILL takes effect when the kernel next schedules the child.
        let alive = || {
            fs::read_to_string(format!("/proc/{child}/stat"))
                .is_ok_and(|stat| !stat.contains(") Z "))
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!alive(), "the unit's child {child} outlived it");
    }

    #[test]
    fn rows_and_table() {
        let unit = |label: &str, test: Option<&str>| Unit {
            executable: exe(label, test.is_some()),
            test: test.map(str::to_string),
            heavy: false,
        };
        let mut a = outcome(unit("t/cluster", Some("one")), true, None);
        a.started = 10.0;
        a.took = 100.0;
        let mut b = outcome(unit("t/cluster", Some("two")), true, None);
        b.started = 50.0;
        b.took = 20.0;
        let rows = rows_of(&[a, b]);
        assert_eq!(
            rows[0],
            Row {
                kind: "binary".into(),
                name: "t/cluster".into(),
                from: 10.0,
                took: 100.0
            }
        );
        assert_eq!(rows.len(), 3);
        let file = tempfile::NamedTempFile::new().unwrap();
        fs::write(file.path(), "phase\tsetup\t0.0\t5.5\n").unwrap();
        append_rows(file.path(), &rows).unwrap();
        let all = parse_rows(&fs::read_to_string(file.path()).unwrap()).unwrap();
        assert_eq!(all.len(), 4);
        let printed = table(&all, 1);
        let lines: Vec<&str> = printed.lines().collect();
        assert!(lines[1].starts_with("phase   setup"), "{printed}");
        assert!(lines[2].starts_with("binary  t/cluster"), "{printed}");
        assert!(lines[3].starts_with("slowest t/cluster::one"), "{printed}");
        assert!(lines[3].ends_with("0:10   1:40"), "{printed}");
        assert!(
            lines[4].starts_with("total") && lines[4].ends_with("1:50"),
            "{printed}"
        );
        assert!(parse_rows("phase\tx\t1\n").is_err());
    }
}
