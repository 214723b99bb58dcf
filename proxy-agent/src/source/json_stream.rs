//! A JSON manifest file, read as a stream: a list's items are decoded one at a time into the
//! stores' compact form as the parser reaches them.
//!
//! Parsing a whole file into one `serde_json::Value` first cost ≈ 35 times the file's size in
//! heap (a 3 MiB List of 10,000 Pods peaked above 100 MiB, the items then copied once more),
//! and the allocator keeps most of such a peak as the agent's RSS long after it is freed
//! (the policy bench's agent-RSS target, docs/benchmarks.md). Streamed, the peak is one item's tree.
//!
//! A list's `kind` may come before or after its `items` (kubectl and `serde_json` write the keys
//! sorted: `apiVersion`, `items`, `kind`). Items read before the list's kind is known are
//! decoded all the same when they name their own kind, and held in that compact form until the
//! kind says whether the document is a list at all (an unknown kind's items are ignored); only
//! an item without a kind of its own is held as a tree until then (a typed list's item takes
//! the list's kind). Whatever is not a list is one small object, handled as before.
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use super::manifests::{ListOf, Parsed, collect, collect_item, list_item_kind};
use crate::compile::Interner;

/// Parses one JSON document into `out` (objects and skipped objects, in file order).
pub fn parse(text: &str, out: &mut Parsed, interner: &mut Interner) -> serde_json::Result<()> {
    let mut de = serde_json::Deserializer::from_str(text);
    Document { out, interner }.deserialize(&mut de)?;
    de.end()
}

/// The top-level value.
struct Document<'a> {
    out: &'a mut Parsed,
    interner: &'a mut Interner,
}

impl<'de> DeserializeSeed<'de> for Document<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

/// A top-level value that is no object is no Kubernetes object: ignored, as before.
macro_rules! ignore_scalars {
    () => {
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
    };
}

impl<'de> Visitor<'de> for Document<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a Kubernetes object or list")
    }

    ignore_scalars!();

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut fields = Map::new();
        // `Some` once `kind` was read.
        let mut kind: Option<String> = None;
        // Items read before `kind`, in file order.
        let mut pending: Vec<Pending> = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            if key == "items" {
                let Some(k) = &kind else {
                    map.next_value_seed(PendingItems {
                        pending: &mut pending,
                        interner: &mut *self.interner,
                    })?;
                    continue;
                };
                match list_item_kind(k) {
                    Some(item_kind) => map.next_value_seed(Items {
                        item_kind,
                        out: &mut *self.out,
                        interner: &mut *self.interner,
                    })?,
                    // Not a list: the items are nothing the agent reads.
                    None => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                continue;
            }
            let value: Value = map.next_value()?;
            if key == "kind" {
                kind = Some(value.as_str().unwrap_or_default().to_owned());
            }
            // A duplicate key: the last one wins, as in `serde_json::Value`.
            fields.insert(key, value);
        }
        if let Some(item_kind) = kind.as_deref().and_then(list_item_kind) {
            for p in pending {
                match p {
                    Pending::Decoded(mut parsed) => {
                        self.out.objects.append(&mut parsed.objects);
                        self.out.skipped.append(&mut parsed.skipped);
                    }
                    Pending::Raw(item) => collect_item(item, item_kind, self.out, self.interner),
                }
            }
        }
        // A list's items are gone from `fields`: collect sees a list without items.
        collect(Value::Object(fields), self.out, self.interner);
        Ok(())
    }
}

/// A list's `items`, each collected as soon as it is read.
struct Items<'a, 'k> {
    item_kind: ListOf<'k>,
    out: &'a mut Parsed,
    interner: &'a mut Interner,
}

impl<'de> DeserializeSeed<'de> for Items<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Items<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list's items")
    }

    // Items that are no array hold no object (as before).
    ignore_scalars!();

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(item) = seq.next_element::<Value>()? {
            collect_item(item, self.item_kind, self.out, self.interner);
        }
        Ok(())
    }
}

/// An item read before its list's kind.
enum Pending {
    /// It named its own kind, which a list's kind never overrides.
    Decoded(Parsed),
    /// It named none: a typed list's kind will say what it is.
    Raw(Value),
}

/// The `items` of a document whose kind is not known yet.
struct PendingItems<'a> {
    pending: &'a mut Vec<Pending>,
    interner: &'a mut Interner,
}

impl<'de> DeserializeSeed<'de> for PendingItems<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for PendingItems<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list's items")
    }

    ignore_scalars!();

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(item) = seq.next_element::<Value>()? {
            if item.get("kind").is_some() {
                let mut parsed = Parsed::default();
                collect(item, &mut parsed, self.interner);
                self.pending.push(Pending::Decoded(parsed));
            } else {
                self.pending.push(Pending::Raw(item));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{Kind, Object};

    fn objects(text: &str) -> Vec<(Kind, String)> {
        let mut out = Parsed::default();
        parse(text, &mut out, &mut Interner::default()).unwrap();
        out.objects
            .iter()
            .map(|o| (o.kind(), o.key().1.to_string()))
            .collect()
    }

    /// The streamed parse and the whole-tree one agree on every shape a file can have.
    #[test]
    fn streamed_equals_whole_tree() {
        let node =
            |n: &str| format!(r#"{{"apiVersion":"v1","kind":"Node","metadata":{{"name":"{n}"}}}}"#);
        let bare = |n: &str| format!(r#"{{"metadata":{{"name":"{n}"}}}}"#);
        let cases = [
            // kind first: streamed
            format!(r#"{{"kind":"List","items":[{},{}]}}"#, node("a"), node("b")),
            format!(
                r#"{{"kind":"NodeList","apiVersion":"v1","items":[{},{}]}}"#,
                bare("a"),
                bare("b")
            ),
            // kind last (kubectl's order)
            format!(r#"{{"items":[{}],"kind":"NodeList"}}"#, bare("c")),
            format!(
                r#"{{"items":[{},{},{}],"kind":"NodeList"}}"#,
                bare("c"),
                node("c2"),
                bare("c3")
            ),
            format!(
                r#"{{"apiVersion":"v1","items":[{}],"kind":"List","metadata":{{}}}}"#,
                node("d")
            ),
            format!(r#"{{"items":[{}]}}"#, node("d2")),
            // not lists
            node("e"),
            format!(r#"{{"kind":"ConfigMapList","items":[{}]}}"#, node("f")),
            format!(r#"{{"items":[{}],"kind":"ConfigMapList"}}"#, node("g")),
            r#"{"kind":"NodeList","items":null}"#.to_owned(),
            "null".to_owned(),
            "[1,2]".to_owned(),
            "\"x\"".to_owned(),
        ];
        for text in cases {
            let mut whole = Parsed::default();
            let v: Value = serde_json::from_str(&text).unwrap();
            collect(v, &mut whole, &mut Interner::default());
            let mut streamed = Parsed::default();
            parse(&text, &mut streamed, &mut Interner::default()).unwrap();
            assert_eq!(streamed.objects, whole.objects, "{text}");
            assert_eq!(streamed.skipped, whole.skipped, "{text}");
        }
        assert_eq!(
            objects(&format!(r#"{{"kind":"NodeList","items":[{}]}}"#, bare("a"))),
            vec![(Kind::Node, "a".to_owned())]
        );
        assert!(
            objects(&format!(
                r#"{{"kind":"ConfigMapList","items":[{}]}}"#,
                node("f")
            ))
            .is_empty()
        );
    }

    #[test]
    fn broken_json_is_an_error_wherever_it_breaks() {
        let mut out = Parsed::default();
        for text in [
            "{",
            r#"{"kind":"List","items":[{"kind":"Node","metadata":{"name":"a"}},"#,
            r#"{"kind":"List","items":[]} trailing"#,
        ] {
            assert!(
                parse(text, &mut out, &mut Interner::default()).is_err(),
                "{text}"
            );
        }
    }

    #[test]
    fn a_pod_list_streams_into_pods() {
        let text = r#"{"apiVersion":"v1","kind":"PodList","items":[
            {"metadata":{"name":"p","namespace":"n","labels":{"app":"a"}},
             "status":{"phase":"Running","podIP":"10.0.0.1"}}]}"#;
        let mut out = Parsed::default();
        parse(text, &mut out, &mut Interner::default()).unwrap();
        let [Object::Pod(p)] = out.objects.as_slice() else {
            panic!("{:?}", out.objects)
        };
        assert_eq!(p.ip, Some(std::net::Ipv4Addr::new(10, 0, 0, 1)));
    }
}
