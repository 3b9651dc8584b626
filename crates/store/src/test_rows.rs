//! Rows that the store's own tests write, on either backend.

use crate::{EventRecord, InstanceRecord, PartitionBatch, Store};

/// A running instance's row in partition 0, as the engine writes it.
pub(crate) fn running(id: &str) -> InstanceRecord {
    InstanceRecord {
        id: id.into(),
        partition: 0,
        definition: "d".into(),
        version: 1,
        status: "running".into(),
        active: true,
        input: "{}".into(),
        output: None,
        error: None,
        created_at: 1,
        updated_at: 1,
        state: "{}".into(),
    }
}

/// A batch of partition 0 with one event of each of `ids` and their rows.
pub(crate) fn one_event_each(seq_before: u64, ids: &[impl AsRef<str>]) -> PartitionBatch {
    PartitionBatch {
        partition: 0,
        seq_before,
        events: ids
            .iter()
            .enumerate()
            .map(|(index, id)| EventRecord {
                partition: 0,
                seq: seq_before + 1 + index as u64,
                epoch: 0,
                instance_id: id.as_ref().to_string(),
                at: 1,
                event_type: "t".into(),
                payload: "{}".into(),
            })
            .collect(),
        instances: ids.iter().map(|id| running(id.as_ref())).collect(),
        ..PartitionBatch::default()
    }
}

/// The seqs of the history of `id`, in partition 0, in the order the store reads them.
pub(crate) fn history_seqs(store: &dyn Store, id: &str) -> Vec<u64> {
    store
        .history(id, 0)
        .unwrap()
        .iter()
        .map(|event| event.seq)
        .collect()
}
