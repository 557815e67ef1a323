//! Query parameters: each named, parsed and range-checked, with a 400 that names the
//! parameter on anything wrong, including a parameter the route does not know (a typo
//! should not silently return unfiltered data).

use std::collections::HashMap;
use std::time::Duration;

use super::error::ApiError;

/// The query parameters of one request.
pub struct Params {
    values: HashMap<String, String>,
}

impl Params {
    /// Checks that only `known` parameters are present, each at most once.
    pub fn new(pairs: Vec<(String, String)>, known: &[&str]) -> Result<Self, ApiError> {
        let mut values = HashMap::new();
        for (k, v) in pairs {
            if !known.contains(&k.as_str()) {
                return Err(ApiError::parameter(
                    &k,
                    format!("unknown here; known: {}", known.join(", ")),
                ));
            }
            if values.insert(k.clone(), v).is_some() {
                return Err(ApiError::parameter(&k, "given more than once"));
            }
        }
        Ok(Self { values })
    }

    /// A text parameter, if present and not empty.
    pub fn text(&self, name: &str) -> Option<&str> {
        self.values
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// `true`/`false` (also `1`/`0`).
    pub fn bool(&self, name: &str) -> Result<Option<bool>, ApiError> {
        self.text(name)
            .map(|v| match v {
                "true" | "1" => Ok(true),
                "false" | "0" => Ok(false),
                _ => Err(ApiError::parameter(
                    name,
                    format!("{v:?} is not true or false"),
                )),
            })
            .transpose()
    }

    /// A whole number in `1..=max`, or `default`.
    pub fn limit(&self, name: &str, default: u32, max: u32) -> Result<u32, ApiError> {
        match self.text(name) {
            None => Ok(default),
            Some(v) => match v.parse::<u32>() {
                Ok(n) if (1..=max).contains(&n) => Ok(n),
                _ => Err(ApiError::parameter(
                    name,
                    format!("{v:?} must be a whole number from 1 to {max}"),
                )),
            },
        }
    }

    /// A time: Unix milliseconds, an RFC 3339 timestamp (`2026-12-02T10:00:00Z`), or a
    /// duration before now (`-1h`, `-15m`).
    pub fn time(&self, name: &str, now_ms: i64) -> Result<Option<i64>, ApiError> {
        let Some(v) = self.text(name) else {
            return Ok(None);
        };
        if let Ok(ms) = v.parse::<i64>() {
            return Ok(Some(ms));
        }
        if let Some(ago) = v.strip_prefix('-') {
            if let Ok(d) = humantime::parse_duration(ago) {
                return Ok(Some(now_ms.saturating_sub(d.as_millis() as i64)));
            }
        }
        if let Ok(t) = humantime::parse_rfc3339_weak(v) {
            if let Ok(d) = t.duration_since(std::time::UNIX_EPOCH) {
                return Ok(Some(d.as_millis() as i64));
            }
        }
        Err(ApiError::parameter(
            name,
            format!("{v:?} is not Unix ms, an RFC 3339 time or a duration ago like -1h"),
        ))
    }

    /// A duration such as `1m`, `15m`, `1h`, at least `min`.
    pub fn duration(&self, name: &str, min: Duration) -> Result<Option<Duration>, ApiError> {
        let Some(v) = self.text(name) else {
            return Ok(None);
        };
        match humantime::parse_duration(v) {
            Ok(d) if d >= min => Ok(Some(d)),
            Ok(_) => Err(ApiError::parameter(
                name,
                format!("{v:?} is shorter than {}", humantime::format_duration(min)),
            )),
            Err(e) => Err(ApiError::parameter(name, format!("{v:?}: {e}"))),
        }
    }

    /// One of `choices`, or `default`.
    pub fn choice<'a>(
        &self,
        name: &str,
        choices: &[&'a str],
        default: &'a str,
    ) -> Result<&'a str, ApiError> {
        match self.text(name) {
            None => Ok(default),
            Some(v) => choices.iter().find(|c| **c == v).copied().ok_or_else(|| {
                ApiError::parameter(name, format!("{v:?} must be one of {}", choices.join(", ")))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(q: &[(&str, &str)], known: &[&str]) -> Result<Params, ApiError> {
        Params::new(
            q.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            known,
        )
    }

    #[test]
    fn an_unknown_or_repeated_parameter_is_named() {
        let e = params(&[("limt", "5")], &["limit"]).err().unwrap();
        assert!(e.message.contains("`limt`"), "{}", e.message);
        let e = params(&[("limit", "5"), ("limit", "6")], &["limit"])
            .err()
            .unwrap();
        assert!(e.message.contains("more than once"));
    }

    #[test]
    fn times_take_ms_rfc3339_and_durations_ago() {
        let p = params(
            &[
                ("a", "1700000000000"),
                ("b", "2023-11-14T22:13:20Z"),
                ("c", "-1h"),
                ("d", "soon"),
            ],
            &["a", "b", "c", "d"],
        )
        .unwrap();
        assert_eq!(p.time("a", 0).unwrap(), Some(1_700_000_000_000));
        assert_eq!(p.time("b", 0).unwrap(), Some(1_700_000_000_000));
        assert_eq!(p.time("c", 7_200_000).unwrap(), Some(3_600_000));
        assert!(p.time("d", 0).unwrap_err().message.contains("`d`"));
        assert_eq!(p.time("missing", 0).unwrap(), None);
    }

    #[test]
    fn limits_and_choices_are_range_checked() {
        let p = params(&[("limit", "0"), ("order", "up")], &["limit", "order"]).unwrap();
        assert!(p.limit("limit", 10, 100).is_err());
        assert!(p.choice("order", &["asc", "desc"], "desc").is_err());
        let p = params(&[("limit", "100")], &["limit"]).unwrap();
        assert_eq!(p.limit("limit", 10, 100).unwrap(), 100);
    }
}
