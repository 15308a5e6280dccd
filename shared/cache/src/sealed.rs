//! Cached features bound to their key: what is stored is
//!
//! ```text
//! "VLMS" | version u8 = 1 | tag [32] | TensorValue encoding ("VLMT" …, crc32c-checked)
//! ```
//!
//! where `tag` is BLAKE3 over the key (length-prefixed) and the value bytes, keyed with the
//! gateways' shared cache secret when one is configured (a MAC: whoever can write to Redis but
//! lacks the secret cannot plant features that verify), plain BLAKE3 otherwise. The key itself
//! commits to the image, the encoder's fingerprint, its preprocessing and the wire dtype, so a
//! value that verifies under a key was computed for exactly that key: another image's features
//! moved under this key, an f16 value under an f32 key, or a value of another model all fail.
//! Values that decode but hold non-finite numbers are refused too. A value failing any check is
//! treated as corrupt (deleted, then recomputed).

use bytes::{BufMut, Bytes, BytesMut};
use vlm_tensor::{TensorLimits, TensorValue};

const MAGIC: &[u8; 4] = b"VLMS";
const VERSION: u8 = 1;
const TAG_LEN: usize = 32;
const HEADER_LEN: usize = MAGIC.len() + 1 + TAG_LEN;
/// BLAKE3 key-derivation context for the MAC key (a fixed, application-specific string).
const MAC_CONTEXT: &str = "vlm-mesh 2026-11 feature cache value MAC v1";

/// Seals and opens cached values (see the module docs).
#[derive(Clone)]
pub struct Sealer {
    mac_key: Option<[u8; 32]>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("keyed", &self.mac_key.is_some())
            .finish()
    }
}

impl Sealer {
    /// Tags keyed with `secret` (any length; shared by every gateway of a mesh), or unkeyed.
    pub fn new(secret: Option<&[u8]>) -> Self {
        Sealer {
            mac_key: secret.map(|s| blake3::derive_key(MAC_CONTEXT, s)),
        }
    }

    /// Whether tags are keyed (a secret is configured).
    pub fn is_keyed(&self) -> bool {
        self.mac_key.is_some()
    }

    fn tag(&self, key: &str, value: &[u8]) -> [u8; TAG_LEN] {
        let mut h = match &self.mac_key {
            Some(k) => blake3::Hasher::new_keyed(k),
            None => blake3::Hasher::new(),
        };
        h.update(&(key.len() as u64).to_le_bytes());
        h.update(key.as_bytes());
        h.update(value);
        *h.finalize().as_bytes()
    }

    /// The bytes to store under `key`.
    pub fn seal(&self, key: &str, value: &TensorValue) -> Bytes {
        let inner = value.encode();
        let mut out = BytesMut::with_capacity(HEADER_LEN + inner.len());
        out.put_slice(MAGIC);
        out.put_u8(VERSION);
        out.put_slice(&self.tag(key, &inner));
        out.put_slice(&inner);
        out.freeze()
    }

    /// The value stored under `key`, or why it must not be used.
    pub fn open(
        &self,
        key: &str,
        stored: Bytes,
        limits: &TensorLimits,
    ) -> Result<TensorValue, String> {
        if stored.len() < HEADER_LEN || &stored[..4] != MAGIC {
            return Err("not a sealed feature value".into());
        }
        if stored[4] != VERSION {
            return Err(format!(
                "sealed value version {} (expected {VERSION})",
                stored[4]
            ));
        }
        let inner = stored.slice(HEADER_LEN..);
        let want = blake3::Hash::from_bytes(self.tag(key, &inner));
        let got: [u8; TAG_LEN] = stored[5..HEADER_LEN].try_into().expect("32 bytes");
        // blake3::Hash compares in constant time: a MAC must not leak how much of a forged tag
        // was right.
        if want != blake3::Hash::from_bytes(got) {
            return Err(if self.is_keyed() {
                "the value's tag does not verify for this key (planted, moved from another key, or written with another secret)".into()
            } else {
                "the value's tag does not match this key (moved from another key or corrupted)"
                    .into()
            });
        }
        let value = TensorValue::decode(inner, limits).map_err(|e| e.to_string())?;
        if !value.meta().dtype().all_finite(value.data()) {
            return Err("the features hold NaN or infinite values".into());
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use vlm_tensor::WireDType;

    use super::*;

    fn value(values: &[f32]) -> TensorValue {
        TensorValue::from_f32(values, &[2, values.len() / 2], WireDType::F32).unwrap()
    }

    #[test]
    fn a_sealed_value_opens_under_its_key_only() {
        let limits = TensorLimits::default();
        let s = Sealer::new(None);
        let v = value(&[1.0, 2.0, 3.0, 4.0]);
        let stored = s.seal("vlm:feat:v1:a", &v);
        assert_eq!(s.open("vlm:feat:v1:a", stored.clone(), &limits).unwrap(), v);
        let e = s
            .open("vlm:feat:v1:b", stored.clone(), &limits)
            .unwrap_err();
        assert!(e.contains("does not match this key"), "{e}");
        for i in [0, 4, 7, HEADER_LEN + 3, stored.len() - 1] {
            let mut bad = stored.to_vec();
            bad[i] ^= 0x40;
            assert!(
                s.open("vlm:feat:v1:a", Bytes::from(bad), &limits).is_err(),
                "byte {i}"
            );
        }
        // The unsealed encoding (what older gateways stored) is refused, not misread.
        assert!(s
            .open("vlm:feat:v1:a", Bytes::from(v.encode()), &limits)
            .is_err());
    }

    #[test]
    fn with_a_secret_a_writer_without_it_cannot_plant_values() {
        let limits = TensorLimits::default();
        let gateways = Sealer::new(Some(b"shared secret of the mesh"));
        let attacker = Sealer::new(None);
        let other = Sealer::new(Some(b"a guess"));
        let key = "vlm:feat:v1:k";
        let zeros = value(&[0.0; 8]);
        for forged in [attacker.seal(key, &zeros), other.seal(key, &zeros)] {
            let e = gateways.open(key, forged, &limits).unwrap_err();
            assert!(e.contains("does not verify"), "{e}");
        }
        let v = value(&[0.5; 8]);
        assert_eq!(
            gateways.open(key, gateways.seal(key, &v), &limits).unwrap(),
            v
        );
    }

    #[test]
    fn non_finite_features_are_refused() {
        let s = Sealer::new(None);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let stored = s.seal("k", &value(&[1.0, bad, 3.0, 4.0]));
            let e = s.open("k", stored, &TensorLimits::default()).unwrap_err();
            assert!(e.contains("NaN or infinite"), "{e}");
        }
    }
}
