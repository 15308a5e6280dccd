use std::fmt;
use std::str::FromStr;

use half::{bf16, f16};
use vlm_proto::DType;

use crate::TensorError;

/// Element type on the wire. Unlike the proto enum it has no "unspecified"
/// value, so holding one means the dtype was validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WireDType {
    F32,
    F16,
    BF16,
}

impl WireDType {
    /// Bytes per element.
    pub const fn size_bytes(self) -> usize {
        match self {
            WireDType::F32 => 4,
            WireDType::F16 | WireDType::BF16 => 2,
        }
    }

    /// Lower-case name as used on command lines: `f32`, `f16`, `bf16`.
    pub const fn name(self) -> &'static str {
        match self {
            WireDType::F32 => "f32",
            WireDType::F16 => "f16",
            WireDType::BF16 => "bf16",
        }
    }

    /// Parses `f32`/`f16`/`bf16` (also `float32`, `float16`, `half`,
    /// `bfloat16`, any case), e.g. a `--wire-dtype` flag. Same as `str::parse`.
    pub fn from_str_name(s: &str) -> Result<Self, TensorError> {
        s.parse()
    }

    /// Validates the raw enum value of a proto `DType` field.
    pub fn from_proto(value: i32) -> Result<Self, TensorError> {
        match DType::try_from(value) {
            Ok(DType::DtypeF32) => Ok(WireDType::F32),
            Ok(DType::DtypeF16) => Ok(WireDType::F16),
            Ok(DType::DtypeBf16) => Ok(WireDType::BF16),
            Ok(DType::DtypeUnspecified) => Err(TensorError::UnspecifiedDType),
            Err(_) => Err(TensorError::UnknownDType(value)),
        }
    }

    /// Like [`WireDType::from_proto`], but DTYPE_UNSPECIFIED means "use `default`"
    /// (request options where the field is optional).
    pub fn from_proto_or(value: i32, default: WireDType) -> Result<Self, TensorError> {
        match Self::from_proto(value) {
            Err(TensorError::UnspecifiedDType) => Ok(default),
            other => other,
        }
    }

    pub const fn to_proto(self) -> DType {
        match self {
            WireDType::F32 => DType::DtypeF32,
            WireDType::F16 => DType::DtypeF16,
            WireDType::BF16 => DType::DtypeBf16,
        }
    }

    /// Appends `values` converted to this dtype, little-endian.
    ///
    /// f32 is copied bit for bit (NaN payloads and -0.0 survive); f16/bf16 use
    /// `half`'s round-to-nearest-even conversion.
    pub fn encode_into(self, values: &[f32], out: &mut Vec<u8>) {
        out.reserve(values.len() * self.size_bytes());
        match self {
            WireDType::F32 => {
                for v in values {
                    out.extend_from_slice(&v.to_bits().to_le_bytes());
                }
            }
            WireDType::F16 => {
                for v in values {
                    out.extend_from_slice(&f16::from_f32(*v).to_bits().to_le_bytes());
                }
            }
            WireDType::BF16 => {
                for v in values {
                    out.extend_from_slice(&bf16::from_f32(*v).to_bits().to_le_bytes());
                }
            }
        }
    }

    /// Encodes `values` into a fresh buffer.
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(values.len() * self.size_bytes());
        self.encode_into(values, &mut out);
        out
    }

    /// True when no element in `bytes` (this dtype, little-endian) is NaN or infinite: the
    /// exponent bits are checked in place, without widening or allocating.
    pub fn all_finite(self, bytes: &[u8]) -> bool {
        match self {
            WireDType::F32 => bytes
                .chunks_exact(4)
                .all(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x7f80_0000 != 0x7f80_0000),
            WireDType::F16 => bytes
                .chunks_exact(2)
                .all(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7c00 != 0x7c00),
            WireDType::BF16 => bytes
                .chunks_exact(2)
                .all(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7f80 != 0x7f80),
        }
    }

    /// Appends the elements in `bytes`, widened to f32. Trailing bytes that do
    /// not form a whole element are ignored; callers validate lengths first.
    pub fn decode_into(self, bytes: &[u8], out: &mut Vec<f32>) {
        out.reserve(bytes.len() / self.size_bytes());
        match self {
            WireDType::F32 => out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_bits(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
            ),
            WireDType::F16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()),
            ),
            WireDType::BF16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()),
            ),
        }
    }

    /// Decodes `bytes` into a fresh buffer.
    pub fn decode(self, bytes: &[u8]) -> Vec<f32> {
        let mut out = Vec::with_capacity(bytes.len() / self.size_bytes());
        self.decode_into(bytes, &mut out);
        out
    }
}

impl From<WireDType> for DType {
    fn from(d: WireDType) -> Self {
        d.to_proto()
    }
}

impl TryFrom<DType> for WireDType {
    type Error = TensorError;
    fn try_from(d: DType) -> Result<Self, TensorError> {
        WireDType::from_proto(d as i32)
    }
}

impl fmt::Display for WireDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for WireDType {
    type Err = TensorError;
    fn from_str(s: &str) -> Result<Self, TensorError> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(WireDType::F32),
            "f16" | "float16" | "half" => Ok(WireDType::F16),
            "bf16" | "bfloat16" => Ok(WireDType::BF16),
            _ => Err(TensorError::UnknownDTypeName(s.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_finite_sees_nan_and_infinity_in_every_dtype() {
        for dtype in [WireDType::F32, WireDType::F16, WireDType::BF16] {
            assert!(dtype.all_finite(&dtype.encode(&[0.0, -1.5, 60000.0, f32::MIN_POSITIVE])));
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                assert!(
                    !dtype.all_finite(&dtype.encode(&[1.0, bad])),
                    "{dtype:?} {bad}"
                );
            }
        }
    }
}
