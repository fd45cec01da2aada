//! How busy the disks of a media class are: the rule that turns what an
//! agent measures (utilisation and queue depth) into the one figure the
//! extender ranks nodes by. Pure arithmetic, in one place for both.

use crate::MediaClass;
use crate::crd::MediaLoad;

/// Average number of I/Os in flight at which a disk of the class counts as
/// saturated: a disk head serves one request at a time, a SATA SSD a few
/// channels' worth, an NVMe drive dozens of queues.
pub const fn saturation_depth(media: MediaClass) -> f64 {
    match media {
        MediaClass::Nvme => 32.0,
        MediaClass::Ssd => 8.0,
        MediaClass::Hdd => 2.0,
    }
}

/// The load of a class whose disks were busy `busy` of the time (0 to 1)
/// with `queue` I/Os in flight on average:
///
/// `load = 100 · (min(busy, 1) + min(queue / saturation_depth, 1)) / 2`
///
/// Utilisation alone overstates a parallel device (one stream keeps an NVMe
/// drive "100 % busy" with room for thirty more); queue depth alone misses
/// a disk that is never idle. Each counts for half.
pub fn measure(media: MediaClass, busy: f64, queue: f64) -> MediaLoad {
    let busy = busy.clamp(0.0, 1.0);
    let queue = queue.max(0.0);
    let depth = (queue / saturation_depth(media)).min(1.0);
    MediaLoad {
        load_percent: (50.0 * (busy + depth)).round() as u32,
        busy_percent: (100.0 * busy).round() as u32,
        queue_depth_milli: (1000.0 * queue).round().min(f64::from(u32::MAX)) as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_weighs_utilisation_and_queue_equally() {
        use MediaClass::*;
        let cases = [
            // (media, busy, queue, load %)
            (Nvme, 0.0, 0.0, 0),
            (Nvme, 1.0, 1.0, 52), // one stream: busy, far from saturated
            (Nvme, 1.0, 32.0, 100),
            (Nvme, 1.0, 500.0, 100), // capped
            (Hdd, 1.0, 1.0, 75),
            (Hdd, 1.0, 2.0, 100),
            (Ssd, 0.5, 2.0, 38),  // 25 + 12.5
            (Ssd, 1.7, -3.0, 50), // nonsense in, bounded out
        ];
        for (media, busy, queue, want) in cases {
            let load = measure(media, busy, queue);
            assert_eq!(load.load_percent, want, "{media} {busy} {queue}");
            assert!(load.busy_percent <= 100);
        }
        assert_eq!(measure(Ssd, 0.255, 1.2345).busy_percent, 26);
        assert_eq!(measure(Ssd, 0.255, 1.2345).queue_depth_milli, 1235);
    }
}
