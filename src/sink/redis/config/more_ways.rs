//! Validation of the settings behind `redis.patterns` and `redis.dependents` (issue 15):
//! `scan_count`, `scans_per_second`, `dep_prefix`, `dependents_depth`.

use super::RedisConfig;
use crate::config::Problem;

/// Largest `SCAN ... COUNT`: beyond this one call can hold a primary for milliseconds.
const MAX_SCAN_COUNT: usize = 100_000;
/// Levels of dependents: a chain deeper than this is almost certainly a registration bug,
/// and each level is at least one more round trip per batch.
const MAX_DEPENDENTS_DEPTH: u32 = 16;

pub(super) fn validate(
    r: &RedisConfig,
    label: &str,
    problem: &impl Fn(&[&'static str], String) -> Problem,
    problems: &mut Vec<Problem>,
) {
    if r.scan_count == 0 || r.scan_count > MAX_SCAN_COUNT {
        problems.push(problem(&["scan_count"], format!("{label}.scan_count must be between 1 and {MAX_SCAN_COUNT}")));
    }
    if r.scans_per_second == 0 || r.scans_per_second > 100_000 {
        problems.push(problem(&["scans_per_second"], format!("{label}.scans_per_second must be between 1 and 100000")));
    }
    if r.dep_prefix.is_empty() {
        problems.push(problem(
            &["dep_prefix"],
            format!("{label}.dep_prefix must not be empty (dependency sets would collide with cache keys)"),
        ));
    } else if r.dep_prefix == r.tag_prefix {
        problems.push(problem(
            &["dep_prefix"],
            format!("{label}.dep_prefix must differ from tag_prefix (a tag would read as a key's dependents)"),
        ));
    }
    if r.dependents_depth == 0 || r.dependents_depth > MAX_DEPENDENTS_DEPTH {
        problems.push(problem(
            &["dependents_depth"],
            format!("{label}.dependents_depth must be between 1 and {MAX_DEPENDENTS_DEPTH}"),
        ));
    }
}

#[cfg(test)]
mod tests {
    use crate::config::load_with_env;

    const HEAD: &str =
        "rules: rules.yaml\nsource:\n  kind: kafka\n  kafka:\n    brokers: \"b:9092\"\n    topics: [\"t\"]\n";

    fn problems(redis: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, format!("{HEAD}sinks:\n  redis:\n    url: \"redis://127.0.0.1:6379\"\n{redis}")).unwrap();
        match load_with_env(&path, []) {
            Ok(_) => String::new(),
            Err(e) => e.problems().iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n"),
        }
    }

    #[test]
    fn defaults_are_valid_and_each_setting_is_bounded_with_its_line() {
        assert_eq!(problems(""), "");
        assert_eq!(
            problems("    scan_count: 50\n    scans_per_second: 5\n    dep_prefix: \"d:\"\n    dependents_depth: 1\n"),
            ""
        );
        let text = problems(
            "    scan_count: 0\n    scans_per_second: 0\n    dep_prefix: \"tag:\"\n    dependents_depth: 17\n",
        );
        assert!(text.contains("c.yaml:10:") && text.contains("scan_count must be between 1 and 100000"), "{text}");
        assert!(
            text.contains("c.yaml:11:") && text.contains("scans_per_second must be between 1 and 100000"),
            "{text}"
        );
        assert!(text.contains("c.yaml:12:") && text.contains("dep_prefix must differ from tag_prefix"), "{text}");
        assert!(text.contains("c.yaml:13:") && text.contains("dependents_depth must be between 1 and 16"), "{text}");
        assert!(problems("    dep_prefix: \"\"\n").contains("dep_prefix must not be empty"));
    }
}
