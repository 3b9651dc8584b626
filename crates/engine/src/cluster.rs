//! Membership, placement and partition ownership of one node.
//!
//! Every heartbeat interval the coordinator of a node:
//! 1. records a heartbeat in the store, which answers with the membership as of
//!    the store's clock (so the nodes' own clocks never decide who is alive);
//! 2. renews the leases it holds; a lease it failed to renew is lost and its
//!    actor stops at once (the store would refuse its commits anyway: fencing);
//! 3. computes the placement from the live members ([`crate::ring`]), the same on
//!    every node, and hands over the partitions placed elsewhere (stop the actor
//!    after its batch, release the lease) and takes the partitions placed on it
//!    whose leases are free or expired;
//! 4. reads every partition's lease, so that requests can be routed to owners.
//!
//! A node that cannot reach the store for a whole lease period stops all its
//! actors on its own: by then its leases may belong to others.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use weir_store::{Announcement, Lease, Member, Membership};

/// Default heartbeat interval.
pub const HEARTBEAT_DEFAULT: Duration = Duration::from_millis(500);
/// Default failure-detection timeout; also the partition lease period.
pub const FAILURE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(2);

/// A node's place in the cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Base URL peers use to reach this node's API (empty: not reachable).
    pub url: String,
    /// A standby takes no partitions while at least `min_active` active nodes live.
    pub standby: bool,
    /// Active nodes needed before standbys stay idle.
    pub min_active: u32,
    /// How often the node heartbeats, renews its leases and rebalances.
    pub heartbeat: Duration,
    /// A node silent this long is dead; leases last this long without renewal.
    pub failure_timeout: Duration,
    /// Virtual nodes per node on the ring.
    pub vnodes: u32,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            url: String::new(),
            standby: false,
            min_active: 1,
            heartbeat: HEARTBEAT_DEFAULT,
            failure_timeout: FAILURE_TIMEOUT_DEFAULT,
            vnodes: crate::ring::VNODES_DEFAULT,
        }
    }
}

impl ClusterConfig {
    pub(crate) fn announcement(&self, node_id: &str) -> Announcement {
        Announcement {
            node_id: node_id.to_string(),
            url: self.url.clone(),
            standby: self.standby,
        }
    }
}

/// The nodes that take partitions: live, not draining, and the standbys only when
/// fewer than `min_active` active nodes live.
pub(crate) fn placed_nodes(members: &[Member], min_active: u32) -> Vec<String> {
    let eligible: Vec<&Member> = members.iter().filter(|m| m.alive && !m.draining).collect();
    let active = eligible.iter().filter(|m| !m.standby).count();
    eligible
        .into_iter()
        .filter(|m| !m.standby || active < min_active as usize)
        .map(|m| m.node_id.clone())
        .collect()
}

/// What a node knows of the cluster, refreshed every heartbeat.
#[derive(Debug, Clone, Default)]
pub(crate) struct View {
    /// The last membership read.
    pub membership: Membership,
    /// Every partition's lease as last read.
    pub leases: Vec<Lease>,
    /// Partition → node the ring places it on.
    pub placement: BTreeMap<u32, String>,
    /// When the last heartbeat succeeded (this node's monotonic clock).
    pub heartbeat_ok_at: Option<Instant>,
}

impl View {
    /// The URL of the live node holding `partition`'s lease, if it is not `me`.
    pub fn owner_url(&self, partition: u32, me: &str) -> Option<String> {
        let lease = self.leases.get(partition as usize)?;
        if lease.owner.is_empty() || lease.owner == me || lease.expires_at <= self.membership.now {
            return None;
        }
        self.membership
            .members
            .iter()
            .find(|m| m.node_id == lease.owner && m.alive && !m.url.is_empty())
            .map(|m| m.url.clone())
    }

    /// URLs of the other live nodes that own partitions.
    pub fn peer_urls(&self, me: &str) -> Vec<String> {
        let owners: std::collections::HashSet<&str> = self
            .leases
            .iter()
            .filter(|l| l.expires_at > self.membership.now)
            .map(|l| l.owner.as_str())
            .collect();
        self.membership
            .members
            .iter()
            .filter(|m| {
                m.alive
                    && m.node_id != me
                    && !m.url.is_empty()
                    && owners.contains(m.node_id.as_str())
            })
            .map(|m| m.url.clone())
            .collect()
    }
}

/// One node as `weir cluster status` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeStatus {
    /// Name.
    pub node_id: String,
    /// API URL.
    pub url: String,
    /// `active` or `standby`.
    pub role: &'static str,
    /// Live by the store's clock.
    pub alive: bool,
    /// Handing its partitions over.
    pub draining: bool,
    /// Milliseconds since its last heartbeat, by the store's clock.
    pub heartbeat_age_ms: u64,
    /// Joined (ms since the epoch).
    pub joined_at: u64,
    /// Partitions whose lease it holds.
    pub partitions: Vec<u32>,
    /// Partitions the ring places on it.
    pub placed: usize,
}

/// One partition's lease as `weir cluster status` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct PartitionStatus {
    /// Partition.
    pub partition: u32,
    /// Lease holder ("" when free or expired).
    pub owner: String,
    /// Fencing epoch.
    pub epoch: u64,
    /// Milliseconds until the lease expires (0 when expired).
    pub expires_in_ms: u64,
    /// Where the ring places it.
    pub placed_on: Option<String>,
}

/// The cluster as one node sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterStatus {
    /// The node answering.
    pub node_id: String,
    /// The store's clock at the reading.
    pub store_now: u64,
    /// Every recorded node.
    pub nodes: Vec<NodeStatus>,
    /// Every partition.
    pub partitions: Vec<PartitionStatus>,
}

pub(crate) fn status(
    node_id: &str,
    membership: &Membership,
    leases: &[Lease],
    min_active: u32,
    vnodes: u32,
) -> ClusterStatus {
    let now = membership.now;
    let placed = crate::ring::assign(
        &placed_nodes(&membership.members, min_active),
        leases.len() as u32,
        vnodes,
    );
    let mut held: HashMap<&str, Vec<u32>> = HashMap::new();
    for lease in leases {
        if !lease.owner.is_empty() && lease.expires_at > now {
            held.entry(lease.owner.as_str())
                .or_default()
                .push(lease.partition);
        }
    }
    let nodes = membership
        .members
        .iter()
        .map(|m| NodeStatus {
            node_id: m.node_id.clone(),
            url: m.url.clone(),
            role: if m.standby { "standby" } else { "active" },
            alive: m.alive,
            draining: m.draining,
            heartbeat_age_ms: now.saturating_sub(m.last_heartbeat),
            joined_at: m.joined_at,
            partitions: held.get(m.node_id.as_str()).cloned().unwrap_or_default(),
            placed: placed.partitions_of(&m.node_id).len(),
        })
        .collect();
    let partitions = leases
        .iter()
        .map(|l| {
            let live = !l.owner.is_empty() && l.expires_at > now;
            PartitionStatus {
                partition: l.partition,
                owner: if live { l.owner.clone() } else { String::new() },
                epoch: l.epoch,
                expires_in_ms: l.expires_at.saturating_sub(now),
                placed_on: placed.owner(l.partition).map(str::to_string),
            }
        })
        .collect();
    ClusterStatus {
        node_id: node_id.to_string(),
        store_now: now,
        nodes,
        partitions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, standby: bool, alive: bool, draining: bool) -> Member {
        Member {
            node_id: id.into(),
            url: format!("http://{id}"),
            standby,
            draining,
            joined_at: 0,
            last_heartbeat: 0,
            alive,
        }
    }

    #[test]
    fn standbys_take_partitions_only_when_too_few_active_nodes_live() {
        let members = vec![
            member("a", false, true, false),
            member("b", false, false, false),
            member("s", true, true, false),
        ];
        assert_eq!(placed_nodes(&members, 1), vec!["a"]);
        assert_eq!(placed_nodes(&members, 2), vec!["a", "s"]);
        let drained = vec![
            member("a", false, true, true),
            member("s", true, true, false),
        ];
        assert_eq!(
            placed_nodes(&drained, 1),
            vec!["s"],
            "a draining node is not counted"
        );
    }
}
