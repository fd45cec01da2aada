//! Snapshot figures, measured in the VM through the agent's own volume code
//! against the floor of bare LVM in the same run:
//! - taking a snapshot (to ready) of a 1 GiB and of a 100 GiB thin volume,
//!   beside a bare `lvcreate --snapshot` of each;
//! - sequential direct writes into a thin volume with one live snapshot
//!   (every first write of a block breaks its sharing) against a thick
//!   volume.
//!
//!     scripts/bench-snapshots.sh

use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use csi_agent::command::Runner;
use csi_agent::config::DiscoveryConfig;
use csi_agent::kernel_log::KernelErrors;
use csi_agent::lvm::Lvm;
use csi_agent::volumes::{VolumeRequest, Volumes};
use lvmlocal_proto::MediaClass;
use lvmlocal_proto::thin::Ratio;
use lvmlocal_tests::guest::{self, disk_at};
use lvmlocal_tests::{GIB, MIB, Vm};

const ROUNDS: usize = 7;
const VG: &str = "lvmlocal-nvme";
/// What each write run writes.
const WRITE_BYTES: u64 = 512 * MIB;

fn main() -> anyhow::Result<ExitCode> {
    if guest::inside() {
        tokio::runtime::Runtime::new()?.block_on(guest_side())?;
        return Ok(ExitCode::SUCCESS);
    }
    let exe = std::env::current_exe()?;
    let output = Vm::new()
        .nvme("bench-a", 5, 8 * GIB)
        .memory_mib(2048)
        .stream(true)
        .run(&[exe.to_str().context("exe path")?])?;
    Ok(ExitCode::from(u8::try_from(output.status).unwrap_or(1)))
}

fn run(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    ensure!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// A thin volume of `size_bytes` charged `charge` bytes (or a snapshot of
/// `origin`).
fn request(id: &str, size_bytes: u64, charge: u64, origin: Option<&str>) -> VolumeRequest {
    VolumeRequest {
        id: id.to_owned(),
        media: MediaClass::Nvme,
        size_bytes,
        access: "block".to_owned(),
        pvc: None,
        thin: Ratio::from_percent(u32::try_from(size_bytes * 100 / charge).unwrap_or(u32::MAX)),
        origin: origin.map(str::to_owned),
        snapshot: origin.is_some(),
    }
}

/// Sequential 1 MiB direct writes of `WRITE_BYTES` into `device`, in MiB/s.
fn write_rate(device: &str) -> anyhow::Result<f64> {
    let count = (WRITE_BYTES / MIB).to_string();
    let started = Instant::now();
    run(&[
        "dd",
        "if=/dev/zero",
        &format!("of={device}"),
        "bs=1M",
        &format!("count={count}"),
        "oflag=direct",
    ])?;
    Ok(WRITE_BYTES as f64 / MIB as f64 / started.elapsed().as_secs_f64())
}

async fn guest_side() -> anyhow::Result<()> {
    let disk = format!("/dev/{}", disk_at("/0000:00:05.0/"));
    run(&["vgcreate", "--addtag", "lvmlocal.io/media=nvme", VG, &disk])?;
    let volumes = Volumes::new(
        Lvm::new(Runner::default()),
        &DiscoveryConfig::default(),
        KernelErrors::default(),
    );

    println!("snapshot creation, median of {ROUNDS} (ms):");
    println!("  origin     lvmlocal   bare lvcreate --snapshot");
    for (label, size) in [("1 GiB", GIB), ("100 GiB", 100 * GIB)] {
        let origin = format!("origin-{}", size / GIB);
        // 1 GiB of pool for either: the 100 GiB one at a ratio of 100.
        volumes.ensure(&request(&origin, size, GIB, None)).await?;
        // Some data in the origin, so the snapshot has blocks to share.
        run(&[
            "dd",
            "if=/dev/urandom",
            &format!("of=/dev/{VG}/{origin}"),
            "bs=1M",
            "count=64",
            "oflag=direct",
        ])?;
        let (mut ours, mut bare) = (Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            let id = format!("snap-{}-{round}", size / GIB);
            let started = Instant::now();
            volumes
                .ensure(&request(&id, size, GIB, Some(&origin)))
                .await?;
            ours.push(started.elapsed());
            volumes.remove(&id).await?;

            let name = format!("bare-{}-{round}", size / GIB);
            let started = Instant::now();
            run(&[
                "lvcreate",
                "--snapshot",
                "--name",
                &name,
                "--setactivationskip",
                "n",
                "--permission",
                "r",
                &format!("{VG}/{origin}"),
            ])?;
            bare.push(started.elapsed());
            run(&["lvremove", "--yes", &format!("{VG}/{name}")])?;
        }
        println!(
            "  {label:<9}  {:>8.1}   {:>8.1}",
            ms(median(&mut ours)),
            ms(median(&mut bare))
        );
    }

    // Throughput: a thick volume, and a thin one written once, snapshotted,
    // then written again (each block's first write after the snapshot
    // copies nothing but takes a new block of the pool).
    let thick = VolumeRequest {
        thin: None,
        ..request("thick", WRITE_BYTES, WRITE_BYTES, None)
    };
    volumes.ensure(&thick).await?;
    // Room in the pool for what the snapshots keep: a pool never shrinks.
    volumes
        .ensure(&request("ballast", 4 * WRITE_BYTES, 4 * WRITE_BYTES, None))
        .await?;
    volumes.remove("ballast").await?;
    volumes
        .ensure(&request("thin", WRITE_BYTES, WRITE_BYTES, None))
        .await?;
    write_rate(&format!("/dev/{VG}/thin"))?;
    volumes
        .ensure(&request(
            "thin-snap",
            WRITE_BYTES,
            WRITE_BYTES,
            Some("thin"),
        ))
        .await?;
    let (mut thick_rates, mut thin_rates) = (Vec::new(), Vec::new());
    for round in 0..3 {
        thick_rates.push(write_rate(&format!("/dev/{VG}/thick"))?);
        if round > 0 {
            // A fresh snapshot each round, so every write breaks sharing.
            volumes.remove("thin-snap").await?;
            volumes
                .ensure(&request(
                    "thin-snap",
                    WRITE_BYTES,
                    WRITE_BYTES,
                    Some("thin"),
                ))
                .await?;
        }
        thin_rates.push(write_rate(&format!("/dev/{VG}/thin"))?);
    }
    let mid = |rates: &mut Vec<f64>| {
        rates.sort_by(f64::total_cmp);
        rates[rates.len() / 2]
    };
    let (thick_rate, thin_rate) = (mid(&mut thick_rates), mid(&mut thin_rates));
    println!(
        "sequential 1 MiB direct writes of {} MiB, median of 3:",
        WRITE_BYTES / MIB
    );
    println!("  thick volume                      {thick_rate:>7.1} MiB/s");
    println!("  thin volume with a live snapshot  {thin_rate:>7.1} MiB/s");
    println!(
        "  ratio                             {:>7.2}",
        thin_rate / thick_rate
    );
    Ok(())
}
