//! What the inventory counts as used, as watch events and extender calls
//! arrive.

use std::time::{Duration, Instant};

use csi_scheduler::capacity::{Refusal, Verdict, explain};
use csi_scheduler::inventory::{Inventory, PodRef, Source};
use csi_scheduler::needs::{ClaimKey, ClaimNeed, PodNeeds};
use kube::runtime::watcher::Event;
use lvmlocal_proto::MediaClass::{self, Hdd, Nvme};
use lvmlocal_proto::heartbeat::Silence;

use crate::support::*;

const TTL: Duration = Duration::from_secs(30);

/// Free bytes of `media` on `node`, asked with a pod that needs nothing:
/// nothing is reserved for it, so asking changes nothing.
fn free(inventory: &mut Inventory, node: &str, media: MediaClass) -> Option<u64> {
    match probe(inventory, node, media, Instant::now()) {
        Verdict::Fits(fit) => Some(fit.left[media]),
        Verdict::Refused(_) => None,
    }
}

/// The verdict on `node` at `now` for a pod that needs nothing of `media`.
fn probe(inventory: &mut Inventory, node: &str, media: MediaClass, now: Instant) -> Verdict {
    let probe = PodNeeds {
        claims: vec![ClaimNeed {
            key: ClaimKey::new("probe", "probe"),
            media,
            bytes: 0,
            placement: None,
            selected_node: None,
            origin_node: None,
        }],
    };
    let pod = PodRef {
        uid: "probe".into(),
        name: "probe/probe".into(),
    };
    inventory.assess(&pod, &probe, &[node], now, TTL).remove(0)
}

/// Runs `pod`'s assessment on `nodes` and returns which fit.
fn assess(
    inventory: &mut Inventory,
    pod: &k8s_openapi::api::core::v1::Pod,
    nodes: &[&str],
) -> Vec<bool> {
    assess_at(inventory, pod, nodes, Instant::now())
}

fn assess_at(
    inventory: &mut Inventory,
    pod: &k8s_openapi::api::core::v1::Pod,
    nodes: &[&str],
    now: Instant,
) -> Vec<bool> {
    let needs = PodNeeds::of(pod, &*inventory).unwrap();
    inventory
        .assess(&PodRef::of(pod), &needs, nodes, now, TTL)
        .iter()
        .map(Verdict::fits)
        .collect()
}

fn inventory(cluster: &Cluster) -> Inventory {
    let mut inventory = Inventory::default();
    synced(&mut inventory);
    apply_all(&mut inventory, cluster);
    inventory
}

fn two_nodes() -> Cluster {
    Cluster {
        storages: vec![
            storage("node-a", &[(Nvme, 100 * GI)]),
            storage("node-b", &[(Nvme, 100 * GI)]),
        ],
        classes: classes(),
        ..Cluster::default()
    }
}

#[test]
fn free_is_total_less_volumes_claims_in_flight_and_reservations() {
    let mut cluster = Cluster {
        storages: vec![storage("node-a", &[(Nvme, 1000 * GI), (Hdd, 4000 * GI)])],
        classes: classes(),
        ..Cluster::default()
    };
    cluster
        .volumes
        .push(volume("pv-1", "node-a", Nvme, 100 * GI, None));
    cluster
        .volumes
        .push(volume("pv-2", "node-a", Hdd, 1000 * GI, None));
    cluster.claims.push(selected(
        claim("db", "in-flight", "nvme", 50 * GI),
        "node-a",
    ));
    cluster.claims.push(claim("db", "wanted", "nvme", 30 * GI));
    let mut inventory = inventory(&cluster);
    assert_eq!(free(&mut inventory, "node-a", Nvme), Some(850 * GI));
    assert_eq!(free(&mut inventory, "node-a", Hdd), Some(3000 * GI));

    let wanting = pod("db", "wanting", "uid-w", &["wanted"]);
    assert_eq!(assess(&mut inventory, &wanting, &["node-a"]), [true]);
    assert_eq!(free(&mut inventory, "node-a", Nvme), Some(820 * GI));
    // Assessing the same pod again replaces its reservation.
    assert_eq!(assess(&mut inventory, &wanting, &["node-a"]), [true]);
    assert_eq!(free(&mut inventory, "node-a", Nvme), Some(820 * GI));
    assert_eq!(inventory.reservations().len(), 1);
}

#[test]
fn a_claim_is_counted_once_from_reservation_to_bound_volume() {
    let mut cluster = two_nodes();
    let wanted = claim("db", "data", "nvme", 40 * GI);
    cluster.claims.push(wanted.clone());
    let mut inventory = inventory(&cluster);
    let db = pod("db", "db-0", "uid-db", &["data"]);

    assert_eq!(
        assess(&mut inventory, &db, &["node-a", "node-b"]),
        [true, true]
    );
    assert_eq!(free(&mut inventory, "node-a", Nvme), Some(60 * GI));
    assert_eq!(free(&mut inventory, "node-b", Nvme), Some(60 * GI));

    // kube-scheduler picked node-b: node-a gets its space back.
    inventory.apply_claim(Event::Apply(selected(wanted.clone(), "node-b")));
    assert_eq!(free(&mut inventory, "node-a", Nvme), Some(100 * GI));
    assert_eq!(free(&mut inventory, "node-b", Nvme), Some(60 * GI));
    assert!(inventory.reservations().get("uid-db").is_none());

    // The volume appears; the claim is still pending until the PV binds.
    inventory.apply_volume(Event::Apply(volume(
        "pvc-1",
        "node-b",
        Nvme,
        40 * GI,
        Some(("db", "data")),
    )));
    assert_eq!(free(&mut inventory, "node-b", Nvme), Some(60 * GI));

    inventory.apply_claim(Event::Apply(bound(selected(wanted, "node-b"), "pvc-1")));
    assert_eq!(free(&mut inventory, "node-b", Nvme), Some(60 * GI));

    inventory.apply_volume(Event::Delete(volume(
        "pvc-1",
        "node-b",
        Nvme,
        40 * GI,
        None,
    )));
    assert_eq!(free(&mut inventory, "node-b", Nvme), Some(100 * GI));
}

#[test]
fn a_volume_seen_before_the_selected_node_settles_the_reservation() {
    let mut cluster = two_nodes();
    cluster.claims.push(claim("db", "a", "nvme", 10 * GI));
    cluster.claims.push(claim("db", "b", "nvme", 20 * GI));
    let mut inventory = inventory(&cluster);
    let db = pod("db", "db-0", "uid-db", &["a", "b"]);
    assert_eq!(
        assess(&mut inventory, &db, &["node-a", "node-b"]),
        [true, true]
    );
    assert_eq!(free(&mut inventory, "node-a", Nvme), Some(70 * GI));

    inventory.apply_volume(Event::Apply(volume(
        "pvc-a",
        "node-a",
        Nvme,
        10 * GI,
        Some(("db", "a")),
    )));
    // Claim a is now a volume on node-a; claim b stays reserved, on node-a only.
    assert_eq!(free(&mut inventory, "node-a", Nvme), Some(70 * GI));
    assert_eq!(free(&mut inventory, "node-b", Nvme), Some(100 * GI));
    let left = inventory.reservations().get("uid-db").unwrap();
    assert_eq!(left.claims.len(), 1);
}

#[test]
fn a_pod_scheduled_again_is_not_charged_for_its_own_claims() {
    let mut cluster = two_nodes();
    cluster
        .claims
        .push(selected(claim("db", "data", "nvme", 40 * GI), "node-a"));
    let mut inventory = inventory(&cluster);
    assert_eq!(free(&mut inventory, "node-a", Nvme), Some(60 * GI));

    let db = pod("db", "db-0", "uid-db", &["data"]);
    let needs = PodNeeds::of(&db, &inventory).unwrap();
    let verdicts = inventory.assess(&PodRef::of(&db), &needs, &["node-a"], Instant::now(), TTL);
    assert_eq!(verdicts.len(), 1);
    let Verdict::Fits(fit) = &verdicts[0] else {
        panic!("{verdicts:?}");
    };
    assert_eq!(fit.left[Nvme], 60 * GI);
    // Its claim is already counted in flight; nothing more is reserved.
    assert_eq!(free(&mut inventory, "node-a", Nvme), Some(60 * GI));
}

#[test]
fn reservations_expire() {
    let mut cluster = two_nodes();
    cluster.claims.push(claim("db", "data", "nvme", 40 * GI));
    let mut inventory = inventory(&cluster);
    let start = Instant::now();
    let db = pod("db", "db-0", "uid-db", &["data"]);
    assert_eq!(assess_at(&mut inventory, &db, &["node-a"], start), [true]);
    assert_eq!(inventory.expire(start + TTL - Duration::from_millis(1)), 1);
    assert_eq!(free(&mut inventory, "node-a", Nvme), Some(60 * GI));
    assert_eq!(inventory.expire(start + TTL), 0);
    assert_eq!(free(&mut inventory, "node-a", Nvme), Some(100 * GI));
}

#[test]
fn deleted_claims_release_their_reservation_and_in_flight_space() {
    let mut cluster = two_nodes();
    let reserved = claim("db", "r", "nvme", 10 * GI);
    let flying = selected(claim("db", "f", "nvme", 20 * GI), "node-b");
    cluster.claims.extend([reserved.clone(), flying.clone()]);
    let mut inventory = inventory(&cluster);
    assert_eq!(
        assess(
            &mut inventory,
            &pod("db", "p", "uid-p", &["r"]),
            &["node-a"]
        ),
        [true]
    );
    assert_eq!(free(&mut inventory, "node-a", Nvme), Some(90 * GI));
    assert_eq!(free(&mut inventory, "node-b", Nvme), Some(80 * GI));
    inventory.apply_claim(Event::Delete(reserved));
    inventory.apply_claim(Event::Delete(flying));
    assert_eq!(free(&mut inventory, "node-a", Nvme), Some(100 * GI));
    assert_eq!(free(&mut inventory, "node-b", Nvme), Some(100 * GI));
}

#[test]
fn a_relist_drops_what_is_gone() {
    let mut cluster = two_nodes();
    cluster
        .volumes
        .push(volume("pv-1", "node-a", Nvme, 10 * GI, None));
    cluster
        .volumes
        .push(volume("pv-2", "node-a", Nvme, 20 * GI, None));
    cluster
        .claims
        .push(selected(claim("db", "f", "nvme", 30 * GI), "node-b"));
    let mut inventory = inventory(&cluster);
    assert_eq!(free(&mut inventory, "node-a", Nvme), Some(70 * GI));
    assert_eq!(free(&mut inventory, "node-b", Nvme), Some(70 * GI));

    inventory.apply_volume(Event::Init);
    inventory.apply_volume(Event::InitApply(cluster.volumes[1].clone()));
    inventory.apply_volume(Event::InitDone);
    inventory.apply_claim(Event::Init);
    inventory.apply_claim(Event::InitDone);
    assert_eq!(free(&mut inventory, "node-a", Nvme), Some(80 * GI));
    assert_eq!(free(&mut inventory, "node-b", Nvme), Some(100 * GI));

    inventory.apply_storage(Event::Init);
    inventory.apply_storage(Event::InitApply(cluster.storages[0].clone()));
    inventory.apply_storage(Event::InitDone);
    assert_eq!(free(&mut inventory, "node-a", Nvme), Some(80 * GI));
    assert_eq!(free(&mut inventory, "node-b", Nvme), None);
}

#[test]
fn storage_classes_decide_what_is_in_flight() {
    let mut cluster = two_nodes();
    cluster.classes.clear();
    cluster
        .claims
        .push(selected(claim("db", "f", "nvme", 30 * GI), "node-a"));
    let mut inventory = inventory(&cluster);
    assert_eq!(free(&mut inventory, "node-a", Nvme), Some(100 * GI));
    for class in classes() {
        inventory.apply_class(Event::Apply(class));
    }
    assert_eq!(free(&mut inventory, "node-a", Nvme), Some(70 * GI));
    inventory.apply_class(Event::Delete(class("nvme", Nvme, None)));
    assert_eq!(free(&mut inventory, "node-a", Nvme), Some(100 * GI));
}

#[test]
fn unsynced_until_every_kind_is_listed() {
    let mut inventory = Inventory::default();
    assert_eq!(inventory.unsynced(), Source::ALL);
    inventory.apply_storage(Event::Init);
    inventory.apply_storage(Event::InitDone);
    inventory.apply_class(Event::InitDone);
    assert_eq!(
        inventory.unsynced(),
        [
            Source::LogicalVolume,
            Source::PersistentVolumeClaim,
            Source::Lease
        ]
    );
    inventory.apply_volume(Event::InitDone);
    inventory.apply_claim(Event::InitDone);
    inventory.apply_lease(Event::Init, Instant::now());
    inventory.apply_lease(Event::InitDone, Instant::now());
    assert!(inventory.unsynced().is_empty());
}

#[test]
fn a_node_whose_agent_is_silent_is_refused_for_good() {
    let mut cluster = two_nodes();
    cluster
        .storages
        .push(storage("node-c", &[(Nvme, 100 * GI)]));
    cluster.claims.push(claim("db", "data", "nvme", 10 * GI));
    let mut inventory = inventory(&cluster);
    let start = Instant::now();
    // node-c's agent never wrote a heartbeat; node-b's last one was renewed
    // when the inventory was built; node-a's agent is still renewing.
    inventory.apply_lease(Event::Delete(heartbeat("node-c", 1)), start);
    let later = start + Duration::from_secs(52);
    inventory.apply_lease(Event::Apply(heartbeat("node-a", 2)), later);

    let db = pod("db", "db-0", "uid-db", &["data"]);
    let needs = PodNeeds::of(&db, &inventory).unwrap();
    let nodes = ["node-a", "node-b", "node-c", "node-d"];
    let verdicts = inventory.assess(&PodRef::of(&db), &needs, &nodes, later, TTL);
    assert!(verdicts[0].fits(), "{verdicts:?}");
    let refusals: Vec<&[Refusal]> = verdicts[1..]
        .iter()
        .map(|verdict| match verdict {
            Verdict::Refused(refusals) => &refusals[..],
            Verdict::Fits(_) => panic!("{verdicts:?}"),
        })
        .collect();
    assert_eq!(
        explain(refusals[0]),
        "the lvmlocal agent has not renewed its heartbeat for 52s"
    );
    assert!(refusals[0][0].is_unresolvable());
    assert_eq!(refusals[1], [Refusal::AgentSilent(Silence::Never)]);
    assert_eq!(explain(refusals[1]), "the lvmlocal agent has no heartbeat");
    // A node without lvmlocal storage has no agent to hear from.
    assert_eq!(refusals[2], [Refusal::NoStorage]);
    // Only the beating node holds a reservation.
    let held = inventory.reservations().get("uid-db").unwrap();
    assert_eq!(held.nodes, [inventory.node_id("node-a").unwrap()]);
}

#[test]
fn heartbeats_follow_their_leases() {
    let mut inventory = inventory(&Cluster {
        storages: vec![storage("node-a", &[(Nvme, 100 * GI)])],
        ..Cluster::default()
    });
    let silent = |verdict: Verdict| match verdict {
        Verdict::Fits(_) => None,
        Verdict::Refused(refusals) => match refusals[..] {
            [Refusal::AgentSilent(silence)] => Some(silence),
            _ => panic!("{refusals:?}"),
        },
    };
    let start = Instant::now();
    let at = |secs: u64| start + Duration::from_secs(secs);
    inventory.apply_lease(Event::Apply(heartbeat("node-a", 10)), at(0));
    assert_eq!(silent(probe(&mut inventory, "node-a", Nvme, at(40))), None);
    assert_eq!(
        silent(probe(&mut inventory, "node-a", Nvme, at(41))),
        Some(Silence::For(Duration::from_secs(41)))
    );
    // Read again unchanged it is no renewal; moved on it is.
    inventory.apply_lease(Event::Apply(heartbeat("node-a", 10)), at(41));
    assert!(silent(probe(&mut inventory, "node-a", Nvme, at(41))).is_some());
    inventory.apply_lease(Event::Apply(heartbeat("node-a", 11)), at(41));
    assert_eq!(silent(probe(&mut inventory, "node-a", Nvme, at(80))), None);

    // A relist that still has it keeps when it was last seen to move.
    inventory.apply_lease(Event::Init, at(90));
    inventory.apply_lease(Event::InitApply(heartbeat("node-a", 11)), at(90));
    inventory.apply_lease(Event::InitDone, at(90));
    assert_eq!(
        silent(probe(&mut inventory, "node-a", Nvme, at(90))),
        Some(Silence::For(Duration::from_secs(49)))
    );
    // One that does not have it drops it.
    inventory.apply_lease(Event::Init, at(91));
    inventory.apply_lease(Event::InitDone, at(91));
    assert_eq!(
        silent(probe(&mut inventory, "node-a", Nvme, at(91))),
        Some(Silence::Never)
    );

    inventory.apply_lease(Event::Apply(heartbeat("node-a", 12)), at(100));
    assert_eq!(silent(probe(&mut inventory, "node-a", Nvme, at(100))), None);
    // A Lease that loses its label leaves the watch as deleted, unlabelled.
    let mut unlabelled = heartbeat("node-a", 12);
    unlabelled.metadata.labels = None;
    inventory.apply_lease(Event::Delete(unlabelled), at(101));
    assert_eq!(
        silent(probe(&mut inventory, "node-a", Nvme, at(101))),
        Some(Silence::Never)
    );
}

#[test]
fn a_node_nothing_refers_to_is_forgotten_and_one_with_volumes_is_not() {
    let mut cluster = two_nodes();
    cluster
        .volumes
        .push(volume("pv-1", "node-b", Nvme, 10 * GI, None));
    cluster.claims.push(claim("db", "wanted", "nvme", 30 * GI));
    let mut inventory = inventory(&cluster);
    // A reservation on node-a keeps it while it lives.
    let wanting = pod("db", "wanting", "uid-w", &["wanted"]);
    let now = Instant::now();
    assert_eq!(
        assess_at(&mut inventory, &wanting, &["node-a"], now),
        [true]
    );
    for name in ["node-a", "node-b"] {
        inventory.apply_storage(Event::Delete(storage(name, &[(Nvme, 100 * GI)])));
        inventory.apply_lease(Event::Delete(heartbeat(name, 1)), now);
    }
    inventory.expire(now);
    assert_eq!(inventory.nodes(), 2);
    let a = inventory.node_id("node-a").unwrap();

    // Once it expires, node-a has nothing left; node-b still has a volume.
    inventory.expire(now + TTL);
    assert_eq!(inventory.nodes(), 1);
    assert!(inventory.node_id("node-a").is_none());

    // A node joining later reuses the id and starts from nothing.
    inventory.apply_storage(Event::Apply(storage("node-c", &[(Nvme, 50 * GI)])));
    inventory.apply_lease(Event::Apply(heartbeat("node-c", 1)), Instant::now());
    assert_eq!(inventory.node_id("node-c"), Some(a));
    assert_eq!(free(&mut inventory, "node-c", Nvme), Some(50 * GI));
    inventory.apply_volume(Event::Delete(volume("pv-1", "node-b", Nvme, 10 * GI, None)));
    inventory.expire(now + TTL);
    assert!(inventory.node_id("node-b").is_none());
    assert_eq!(inventory.nodes(), 1);
    assert_eq!(free(&mut inventory, "node-c", Nvme), Some(50 * GI));
}

#[test]
fn bytes_no_volume_accounts_for_are_used() {
    let mut cluster = two_nodes();
    let mut reported = storage("node-a", &[(Nvme, 100 * GI)]);
    reported.status.as_mut().unwrap().unaccounted_bytes = Some(lvmlocal_proto::crd::MediaBytes {
        nvme: 60 * GI,
        ssd: 0,
        hdd: 7 * GI,
    });
    cluster.storages[0] = reported;
    cluster
        .volumes
        .push(volume("pv-1", "node-a", Nvme, 10 * GI, None));
    let mut inventory = inventory(&cluster);
    assert_eq!(free(&mut inventory, "node-a", Nvme), Some(30 * GI));
    assert_eq!(free(&mut inventory, "node-b", Nvme), Some(100 * GI));
    // A claim of 40 GiB no longer fits node-a.
    cluster.claims.push(claim("db", "big", "nvme", 40 * GI));
    inventory.apply_claim(Event::Apply(cluster.claims[0].clone()));
    let wanting = pod("db", "wanting", "uid-w", &["big"]);
    assert_eq!(
        assess(&mut inventory, &wanting, &["node-a", "node-b"]),
        [false, true]
    );
}

#[test]
fn a_copy_fits_only_its_origins_node_however_often_the_origin_changes() {
    let mut cluster = two_nodes();
    let mut clone = claim("db", "copy", "nvme", 10 * GI);
    clone.spec.as_mut().unwrap().data_source = Some(
        serde_json::from_value(serde_json::json!({
        "kind": "PersistentVolumeClaim", "name": "data"}))
        .unwrap(),
    );
    cluster.claims.push(clone);
    let mut inventory = inventory(&cluster);
    let copier = pod("db", "copier", "uid-copier", &["copy"]);
    // Its origin's volume is not known yet: no node, for now.
    let needs = PodNeeds::of(&copier, &inventory);
    assert!(
        needs
            .as_ref()
            .is_err_and(|err| err.to_string().contains("claim db/data")),
        "{needs:?}"
    );
    let origin = volume("pvc-0", "node-b", Nvme, 10 * GI, Some(("db", "data")));
    inventory.apply_volume(Event::Apply(origin.clone()));
    assert_eq!(
        assess(&mut inventory, &copier, &["node-a", "node-b"]),
        [false, true]
    );
    // The origin's status changes: it is still there, on node-b.
    let mut updated = origin.clone();
    updated.metadata.resource_version = Some("2".into());
    inventory.apply_volume(Event::Apply(updated));
    assert_eq!(
        assess(&mut inventory, &copier, &["node-a", "node-b"]),
        [false, true]
    );
    inventory.apply_volume(Event::Delete(origin));
    assert!(PodNeeds::of(&copier, &inventory).is_err());
}
