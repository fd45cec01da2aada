//! Drives a built lvmlocal binary as a child process. Shared by the
//! lifecycle tests of the binary crates (included with `#[path]`), since
//! they all stop the same way through `lvmlocal_proto::runtime`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const TIMEOUT: Duration = Duration::from_secs(10);

/// Starts `bin`, waits until it logs `started`, sends `signal`, and returns
/// how it exited. Panics if either step takes longer than the timeout.
pub fn stop_with(bin: &str, args: &[&str], started: &str, signal: Signal) -> ExitStatus {
    let mut child = spawn(bin, args);
    let stderr = BufReader::new(child.stderr.take().expect("stderr is piped"));
    let (lines_tx, lines) = mpsc::channel();
    // Keep draining stderr so the child never blocks on a full pipe.
    thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });

    let deadline = Instant::now() + TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(started) => break,
            Ok(_) => {}
            Err(err) => {
                let _ = child.kill();
                panic!("{bin} did not log {started:?}: {err}");
            }
        }
    }

    let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid fits in i32"));
    kill(pid, signal).expect("signal the child");
    wait_with_timeout(&mut child)
}

/// Runs `bin` with `args` to completion and returns its exit status and
/// combined output.
pub fn run(bin: &str, args: &[&str]) -> (ExitStatus, String) {
    let output = command(bin, args).output().expect("run the binary");
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    (output.status, text)
}

fn command(bin: &str, args: &[&str]) -> Command {
    let mut command = Command::new(bin);
    // The caller's environment must not change what the binary logs or which
    // flags it sees.
    command
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("NODE_NAME")
        .env_remove("CSI_ENDPOINT")
        .stdin(Stdio::null());
    command
}

fn spawn(bin: &str, args: &[&str]) -> Child {
    command(bin, args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the binary")
}

fn wait_with_timeout(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().expect("poll the child") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("child did not exit within {TIMEOUT:?} of the stop signal");
        }
        thread::sleep(Duration::from_millis(20));
    }
}
