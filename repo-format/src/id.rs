//! Typed 32-byte identifiers.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name([u8; 32]);

        impl $name {
            /// Wraps raw bytes.
            pub const fn from_bytes(bytes: [u8; 32]) -> Self {
                $name(bytes)
            }

            /// The raw bytes.
            pub const fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            /// Lower-case hex (64 characters).
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self.to_hex())
            }
        }

        impl FromStr for $name {
            type Err = Error;

            fn from_str(s: &str) -> Result<Self> {
                let mut out = [0u8; 32];
                hex::decode_to_slice(s, &mut out).map_err(|e| {
                    Error::with_source(
                        crate::ErrorKind::InvalidArgument,
                        format!(concat!("invalid ", $what, " {:?}: expected 64 hex digits"), s),
                        e,
                    )
                })?;
                Ok($name(out))
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_hex())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// Id of a data chunk: keyed BLAKE3 of its plaintext (plain BLAKE3 when unencrypted).
    ChunkId,
    "chunk id"
);
id_type!(
    /// Id of a disk index object: keyed BLAKE3 of its plaintext encoding.
    IndexId,
    "index id"
);
id_type!(
    /// Id of a snapshot: keyed BLAKE3 of its manifest's plaintext JSON.
    SnapshotId,
    "snapshot id"
);
id_type!(
    /// Id of a boot-test result: keyed BLAKE3 of its plaintext JSON.
    BootTestId,
    "boot-test result id"
);
id_type!(
    /// Id of a key slot (random).
    KeySlotId,
    "key slot id"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_serde() {
        let id = ChunkId::from_bytes([0xab; 32]);
        let s = id.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s.parse::<ChunkId>().unwrap(), id);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{s}\""));
        assert_eq!(serde_json::from_str::<ChunkId>(&json).unwrap(), id);
        assert!("abc".parse::<ChunkId>().is_err());
        assert!("zz".repeat(32).parse::<SnapshotId>().is_err());
        assert!(serde_json::from_str::<IndexId>("\"00\"").is_err());
    }
}
