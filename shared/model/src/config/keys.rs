//! The keys each checkpoint file section is read for, taken from the loader's own `Deserialize`
//! structs (serde's derive hands a struct's field names to the deserializer), so that the list
//! cannot drift from what the loader reads. `tests/field_coverage.rs` checks that a fixture varies
//! every one of them away from its default.

use serde::de::{self, DeserializeOwned, Visitor};

/// One section of a checkpoint's files and the keys the loader reads there.
#[derive(Debug, Clone, Copy)]
pub struct ConfigSection {
    /// The file the section lives in (`config.json`, `processor_config.json`, …).
    pub file: &'static str,
    /// The JSON path inside the file, e.g. `["text_config", "rope_parameters"]` (empty: the top).
    pub path: &'static [&'static str],
    /// The checkpoint families (`config.json`'s `model_type`) whose loader reads this section.
    pub families: &'static [&'static str],
    /// The keys read there.
    pub keys: &'static [&'static str],
}

/// The field names of a derived `Deserialize` struct.
pub(crate) fn keys_of<T: DeserializeOwned>() -> &'static [&'static str] {
    match T::deserialize(KeyProbe) {
        Err(Probed(Some(fields))) => fields,
        _ => panic!("keys_of: {} is not a struct", std::any::type_name::<T>()),
    }
}

/// A deserializer that answers every request with the struct fields serde asked for (or none).
struct KeyProbe;

#[derive(Debug)]
struct Probed(Option<&'static [&'static str]>);

impl std::fmt::Display for Probed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "key probe")
    }
}

impl std::error::Error for Probed {}

impl de::Error for Probed {
    fn custom<T: std::fmt::Display>(_: T) -> Self {
        Probed(None)
    }
}

impl<'de> de::Deserializer<'de> for KeyProbe {
    type Error = Probed;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Probed> {
        Err(Probed(None))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Probed> {
        Err(Probed(Some(fields)))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Two {
        a: Option<u32>,
        #[serde(rename = "b_key")]
        b: Option<String>,
    }

    #[test]
    fn keys_are_the_serialized_field_names() {
        assert_eq!(keys_of::<Two>(), &["a", "b_key"]);
    }
}
