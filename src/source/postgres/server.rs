//! What the server is (version, primary or standby, settings) against what the config asks
//! for: one sentence per problem, naming the setting to change. Shared by the start-up checks
//! and `check --against-db`, so both say the same thing; pure, so tested without a database.
//!
//! | feature                         | 15 | 16 | 17 | 18 |
//! |---------------------------------|----|----|----|----|
//! | decoding on a physical standby  | no | yes| yes| yes|
//! | failover slots, slot sync       | no | no | yes| yes|
//! | `invalidation_reason`           | no | no*| yes| yes (+ `idle_timeout`) |
//!
//! (*) 16 says only `conflicting` (a standby's slot conflicted with recovery).

use super::sql::{ServerInfo, SlotStatus};

/// Where the recovery steps for an invalidated slot are.
pub(super) const RECOVERY_DOC: &str = "docs/postgres.md, \"Recovering from an invalidated slot\"";

/// Whether slots are created as failover slots: the option, else on where the server can (a
/// 17+ primary). A standby cannot create failover slots (it keeps synced copies of the
/// primary's instead).
pub(super) fn wants_failover(info: &ServerInfo, failover: Option<bool>) -> bool {
    failover.unwrap_or(info.major() >= 17 && !info.in_recovery)
}

/// Problems of the server itself for this config; empty when the source can run there.
pub(super) fn server_problems(info: &ServerInfo, failover: Option<bool>) -> Vec<String> {
    let mut problems = Vec::new();
    if info.wal_level != "logical" {
        problems.push(if info.in_recovery {
            format!(
                "the standby runs with wal_level = {}: decoding on a standby needs wal_level = logical on the standby as well as on its primary (postgresql.conf, then restart the standby)",
                info.wal_level
            )
        } else {
            format!(
                "the server runs with wal_level = {}: logical replication needs wal_level = logical in postgresql.conf (then restart PostgreSQL)",
                info.wal_level
            )
        });
    }
    if failover == Some(true) && info.major() < 17 {
        problems.push(format!(
            "source.postgres.failover: true needs PostgreSQL 17 or newer, but the server runs {}: remove source.postgres.failover (or set it to false)",
            info.version
        ));
    }
    if info.in_recovery {
        if info.major() < 16 {
            problems.push(format!(
                "the server is a standby (in recovery) and PostgreSQL {} cannot decode on a standby (16 and newer can): point source.postgres.url at the primary",
                info.version
            ));
        } else {
            if !info.hot_standby_feedback {
                problems.push(
                    "the standby runs with hot_standby_feedback = off: decoding on a standby needs hot_standby_feedback = on in the standby's postgresql.conf (then reload), else the primary's vacuum removes rows the slot needs and the slot is invalidated (rows_removed)"
                        .to_string(),
                );
            }
            if failover == Some(true) && info.major() >= 17 {
                problems.push(
                    "source.postgres.failover: true cannot be used on a standby (PostgreSQL creates failover slots on the primary; a standby keeps synced copies of them): set source.postgres.failover: false, or point source.postgres.url at the primary"
                        .to_string(),
                );
            }
        }
    }
    problems
}

/// Why a slot can no longer be used, in the server's words (`reason`) with what to do; `None`
/// when only `wal_status = lost` is known (PostgreSQL before 17).
pub(super) fn invalidated_sentence(slot: &str, reason: Option<&str>) -> String {
    let (why, fix) = match reason {
        None | Some("wal_removed") => (
            "wal_removed: the server removed WAL the slot still needed, so changes were missed",
            "raise max_slot_wal_keep_size (or keep the daemon from being away that long)",
        ),
        Some("rows_removed") => (
            "rows_removed: the primary's vacuum removed rows the slot still needed",
            "on a standby, set hot_standby_feedback = on and primary_slot_name so the primary keeps them",
        ),
        Some("wal_level_insufficient") => (
            "wal_level_insufficient: the primary runs with a wal_level below logical",
            "set wal_level = logical on the primary and restart it",
        ),
        // PostgreSQL 16 says only that a standby's slot conflicted with recovery.
        Some("conflicting") => (
            "conflicting: on this standby it conflicted with recovery (the primary's vacuum removed rows it needed, or the primary's wal_level dropped below logical)",
            "set hot_standby_feedback = on and primary_slot_name on the standby and keep wal_level = logical on the primary",
        ),
        Some("idle_timeout") => (
            "idle_timeout: it was unused longer than idle_replication_slot_timeout",
            "raise idle_replication_slot_timeout above the daemon's longest planned downtime",
        ),
        Some(_) => ("", "see the server's log"),
    };
    let why = match reason {
        Some(r) if why.is_empty() => format!("the server's reason is {r:?}"),
        Some(_) => format!("the server's reason is {why}"),
        None => format!("wal_status = lost, {}", why.trim_start_matches("wal_removed: ")),
    };
    format!("replication slot {slot:?} is invalidated ({why}): {fix}, then follow the recovery steps in {RECOVERY_DOC}")
}

/// Problems of an existing slot on this server (beyond plugin and database, checked apart).
pub(super) fn slot_problems(slot: &str, info: &ServerInfo, status: &SlotStatus) -> Vec<String> {
    let mut problems = Vec::new();
    if status.is_invalidated() {
        problems.push(invalidated_sentence(slot, status.invalidation_reason.as_deref()));
    } else if status.synced && info.in_recovery {
        problems.push(format!(
            "replication slot {slot:?} on this standby is being synchronized from the primary (synced = true, sync_replication_slots = on), and PostgreSQL decodes from such a slot only after the standby is promoted: point source.postgres.url at the primary, or name a slot created on the standby in source.postgres.slot"
        ));
    }
    problems
}

/// A warning for a slot that would not survive a failover while standbys could take over.
pub(super) fn failover_warning(slot: &str, info: &ServerInfo, status: &SlotStatus, standbys: i64) -> Option<String> {
    (info.major() >= 17 && !info.in_recovery && !status.failover && standbys > 0).then(|| {
        format!(
            "replication slot {slot:?} is not a failover slot while {standbys} standby(s) stream from this server: after a failover it is gone and changes since its last confirmation are never invalidated; recreate it with SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput', false, false, true); (or ALTER_REPLICATION_SLOT {slot} (FAILOVER true) on a replication connection) and set sync_replication_slots = on on the standbys"
        )
    })
}

/// The sentence for a slot that could not be created on a standby because of the primary's
/// `wal_level` (the server says "logical decoding on standby requires wal_level >= logical on
/// the primary"); `None` for any other failure.
pub(super) fn creation_failure(server_text: &str) -> Option<String> {
    (server_text.contains("wal_level") && server_text.contains("on the primary")).then(|| {
        "the primary runs with a wal_level below logical, so this standby cannot decode: set wal_level = logical on the primary (postgresql.conf, then restart the primary)".to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(version_num: i32, in_recovery: bool, hot_standby_feedback: bool) -> ServerInfo {
        ServerInfo {
            version_num,
            version: format!("{}.2", version_num / 10_000),
            in_recovery,
            wal_level: "logical".into(),
            hot_standby_feedback,
        }
    }

    #[test]
    fn failover_defaults_on_for_a_17_primary_only() {
        assert!(wants_failover(&server(170_002, false, false), None));
        assert!(wants_failover(&server(180_006, false, false), None));
        assert!(!wants_failover(&server(160_004, false, false), None));
        assert!(!wants_failover(&server(180_006, true, true), None));
        assert!(!wants_failover(&server(180_006, false, false), Some(false)));
    }

    #[test]
    fn bad_settings_name_the_setting() {
        assert!(server_problems(&server(180_006, false, false), None).is_empty());
        assert!(server_problems(&server(180_006, true, true), None).is_empty());
        let p = server_problems(&server(150_004, false, false), Some(true));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("source.postgres.failover: true needs PostgreSQL 17") && p[0].contains("15.2"), "{p:?}");
        let p = server_problems(&server(180_006, true, false), None);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("hot_standby_feedback = on"), "{p:?}");
        let p = server_problems(&server(150_004, true, true), None);
        assert!(p[0].contains("cannot decode on a standby"), "{p:?}");
        let p = server_problems(&server(170_000, true, true), Some(true));
        assert!(p[0].contains("failover: false"), "{p:?}");
        let mut primary = server(160_000, false, false);
        primary.wal_level = "replica".into();
        assert!(server_problems(&primary, None)[0].contains("wal_level = logical"));
    }

    #[test]
    fn invalidation_reasons_are_quoted_with_their_fix() {
        for (reason, fix) in [
            ("wal_removed", "max_slot_wal_keep_size"),
            ("rows_removed", "hot_standby_feedback = on"),
            ("wal_level_insufficient", "wal_level = logical on the primary"),
            ("idle_timeout", "idle_replication_slot_timeout above the daemon's longest planned downtime"),
        ] {
            let s = invalidated_sentence("s", Some(reason));
            assert!(s.contains(&format!("reason is {reason}")), "{s}");
            assert!(s.contains(fix) && s.contains(RECOVERY_DOC), "{s}");
        }
        assert!(invalidated_sentence("s", Some("new_reason")).contains("\"new_reason\""));
        assert!(invalidated_sentence("s", None).contains("wal_status = lost"));
    }

    #[test]
    fn synced_slots_and_missing_failover() {
        let status = SlotStatus { synced: true, failover: true, ..SlotStatus::default() };
        let p = slot_problems("s", &server(180_006, true, true), &status);
        assert!(p[0].contains("synchronized from the primary"), "{p:?}");
        assert!(slot_problems("s", &server(180_006, false, true), &status).is_empty(), "promoted: usable");
        let plain = SlotStatus::default();
        assert!(failover_warning("s", &server(180_006, false, false), &plain, 1).is_some());
        assert!(failover_warning("s", &server(180_006, false, false), &plain, 0).is_none());
        assert!(failover_warning("s", &server(160_000, false, false), &plain, 1).is_none());
        assert!(creation_failure(
            "logical decoding on standby requires \"wal_level\" >= \"logical\" on the primary (SQLSTATE 55000)"
        )
        .is_some());
    }
}
