//! Boots the test bed VM with the disks asked for, runs one command inside it
//! and exits with the command's status.
//!
//!     vmbed --nvme 5=4G --nvme 6=4G --ssd 0=2G --hdd 1=8G -- lsblk

use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Parser;
use lvmlocal_tests::{DEFAULT_AHCI_SLOT, Disk, DiskBus, Vm, parse_size};

#[derive(Parser)]
#[command(about = "Run a command in a VM with emulated NVMe, SATA SSD and SATA HDD disks")]
struct Args {
    /// NVMe namespace: SLOT[/NSID]=SIZE[:NAME], slot in hex (e.g. 5=4G, 0x6/2=1G:db).
    #[arg(long, value_name = "SPEC")]
    nvme: Vec<String>,
    /// SATA SSD on the AHCI controller at slot 0x10: PORT=SIZE[:NAME].
    #[arg(long, value_name = "SPEC")]
    ssd: Vec<String>,
    /// SATA HDD (7200 rpm) on the AHCI controller at slot 0x10: PORT=SIZE[:NAME].
    #[arg(long, value_name = "SPEC")]
    hdd: Vec<String>,
    /// Keep the disk images here and reuse the ones already there (matched by NAME).
    #[arg(long)]
    disk_dir: Option<std::path::PathBuf>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1536)]
    memory: u32,
    /// Print the guest's kernel console after the run.
    #[arg(long)]
    console: bool,
    /// The command to run in the guest.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

fn main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    let mut vm = Vm::new().memory_mib(args.memory).stream(true);
    if let Some(dir) = &args.disk_dir {
        vm = vm.disk_dir(dir);
    }
    for spec in &args.nvme {
        vm = vm.disk(nvme(spec).with_context(|| format!("--nvme {spec}"))?);
    }
    for (specs, rotational) in [(&args.ssd, false), (&args.hdd, true)] {
        for spec in specs {
            vm = vm.disk(sata(spec, rotational).with_context(|| format!("SATA disk {spec}"))?);
        }
    }
    let output = vm.run(&args.command)?;
    if args.console {
        eprintln!("--- console ---\n{}", output.console);
    }
    Ok(ExitCode::from(u8::try_from(output.status).unwrap_or(1)))
}

/// Splits `PLACE=SIZE[:NAME]`.
fn split(spec: &str) -> anyhow::Result<(&str, u64, Option<&str>)> {
    let Some((place, rest)) = spec.split_once('=') else {
        bail!("expected PLACE=SIZE[:NAME]");
    };
    let (size, name) = match rest.split_once(':') {
        Some((size, name)) => (size, Some(name)),
        None => (rest, None),
    };
    Ok((place, parse_size(size)?, name))
}

fn nvme(spec: &str) -> anyhow::Result<Disk> {
    let (place, size, name) = split(spec)?;
    let (slot, nsid) = match place.split_once('/') {
        Some((slot, nsid)) => (slot, nsid.parse().context("namespace id")?),
        None => (place, 1),
    };
    let slot = u8::from_str_radix(slot.trim_start_matches("0x"), 16).context("PCI slot")?;
    Ok(Disk {
        name: name.map_or_else(|| format!("nvme{slot:x}n{nsid}"), str::to_owned),
        size,
        bus: DiskBus::Nvme { slot, nsid },
    })
}

fn sata(spec: &str, rotational: bool) -> anyhow::Result<Disk> {
    let (port, size, name) = split(spec)?;
    let port: u8 = port.parse().context("AHCI port")?;
    let kind = if rotational { "hdd" } else { "ssd" };
    Ok(Disk {
        name: name.map_or_else(|| format!("{kind}{port}"), str::to_owned),
        size,
        bus: DiskBus::Sata {
            controller: DEFAULT_AHCI_SLOT,
            port,
            rotational,
        },
    })
}
