//! Every magic number, version and key-derivation context of the on-disk format.
//!
//! **Do not modify.** Changing any value here makes existing repositories unreadable (or, for the
//! derivation contexts, silently changes every chunk id and key). New format versions add new
//! constants; they never edit these. Each value is documented in `FORMAT.md`, section 1.

/// `format` field of the repository `config` object.
pub const CONFIG_FORMAT: &str = "lifeboat-repo";
/// Version of the repository layout / config this build writes and reads.
pub const CONFIG_VERSION: u32 = 1;
/// Version of a repository whose config has a `frame_size`: chunk objects may be framed
/// (object version 2). A build that reads only version 1 refuses it at open.
pub const CONFIG_VERSION_FRAMED: u32 = 2;
/// Version of a framed repository whose chunk objects may also be delta objects (object
/// version 3, frames referring to a base object). A build that reads only 1 and 2 refuses it.
pub const CONFIG_VERSION_DELTA: u32 = 3;
/// `encryption` value of a repository encrypted with XChaCha20-Poly1305.
pub const ENCRYPTION_XCHACHA_BLAKE3: &str = "xchacha20poly1305-blake3";
/// `encryption` value of a repository encrypted with AEGIS-256.
pub const ENCRYPTION_AEGIS256_BLAKE3: &str = "aegis256-blake3";
/// `encryption` value of an unencrypted repository.
pub const ENCRYPTION_NONE: &str = "none";
/// `compression` value (the only one defined).
pub const COMPRESSION_ZSTD: &str = "zstd";

/// Version of the key-slot JSON.
pub const KEY_SLOT_VERSION: u32 = 1;

/// Magic bytes opening every sealed object ("LifeBoat OBject").
pub const OBJECT_MAGIC: [u8; 4] = *b"LBOB";
/// Version byte of the sealed-object header.
pub const OBJECT_VERSION: u8 = 1;
/// Version byte of a framed chunk object (a chunk sealed as independent frames).
pub const OBJECT_VERSION_FRAMED: u8 = 2;
/// Version byte of a delta chunk object: a framed object some of whose frames are those of a
/// base object (version 2) named in its header.
pub const OBJECT_VERSION_DELTA: u8 = 3;
/// Length of the sealed-object header.
pub const OBJECT_HEADER_LEN: usize = 8;
/// Object kind byte: a data chunk.
pub const KIND_CHUNK: u8 = 1;
/// Object kind byte: a per-disk index.
pub const KIND_INDEX: u8 = 2;
/// Object kind byte: a snapshot manifest.
pub const KIND_MANIFEST: u8 = 3;
/// Object kind byte: a boot-test result.
pub const KIND_BOOT_TEST: u8 = 4;
/// Object flag: payload is zstd-compressed.
pub const FLAG_ZSTD: u8 = 0b0000_0001;
/// Object flag: payload is encrypted (nonce + XChaCha20-Poly1305 ciphertext and tag).
pub const FLAG_ENCRYPTED: u8 = 0b0000_0010;
/// Frame table flag: the frame's payload is zstd-compressed.
pub const FRAME_FLAG_ZSTD: u8 = 0b0000_0001;
/// Frame table flag: the frame is all zero bytes; nothing is stored for it.
pub const FRAME_FLAG_ZERO: u8 = 0b0000_0010;
/// Frame table flag (delta objects only): the frame is the same-numbered frame of the base
/// object; nothing is stored for it here.
pub const FRAME_FLAG_BASE: u8 = 0b0000_0100;
/// First bytes of a frame's AAD ("LifeBoat FRame").
pub const FRAME_AAD_MAGIC: [u8; 4] = *b"LBFR";
/// Stored nonce length: XChaCha20's nonce; AEGIS-256 takes these 24 bytes followed by 8 zero
/// bytes as its 32-byte nonce.
pub const NONCE_LEN: usize = 24;
/// Authentication tag length (Poly1305, or AEGIS-256 with its 128-bit tag).
pub const TAG_LEN: usize = 16;

/// Magic bytes of the disk index plaintext ("LifeBoat IndeX").
pub const INDEX_MAGIC: [u8; 4] = *b"LBIX";
/// Version byte of a whole disk index (or of one page of a paged index).
pub const INDEX_VERSION: u8 = 1;
/// Version byte of the root of a paged disk index.
pub const INDEX_ROOT_VERSION: u8 = 2;
/// Index root record tag: a page whose entries are all zero (no object).
pub const INDEX_PAGE_ZERO: u8 = 0x00;
/// Index root record tag: a page stored as an index object (followed by its 32-byte id).
pub const INDEX_PAGE_STORED: u8 = 0x01;
/// Index record tag: a run of all-zero chunks (followed by a LEB128 count).
pub const INDEX_TAG_ZERO_RUN: u8 = 0x00;
/// Index record tag: one stored chunk (followed by its 32-byte id).
pub const INDEX_TAG_CHUNK: u8 = 0x01;

/// Manifest JSON version.
pub const MANIFEST_VERSION: u32 = 1;

/// `blake3::derive_key` context for the chunk/object id key.
pub const CONTEXT_CHUNK_ID: &str = "lifeboat v1 chunk id";
/// `blake3::derive_key` context for the object encryption key (XChaCha20-Poly1305).
pub const CONTEXT_OBJECT_ENCRYPTION: &str = "lifeboat v1 object encryption";
/// `blake3::derive_key` context for the object encryption key of AEGIS-256 repositories.
pub const CONTEXT_OBJECT_ENCRYPTION_AEGIS256: &str = "lifeboat v1 object encryption aegis256";
/// `blake3::derive_key` context for the config MAC key.
pub const CONTEXT_CONFIG_MAC: &str = "lifeboat v1 config mac";
/// `blake3::derive_key` context turning a key file's secret into a key-encryption key.
pub const CONTEXT_KEYFILE: &str = "lifeboat v1 keyfile";

/// First line of a key file.
pub const KEYFILE_HEADER: &str = "# lifeboat key file v1";

/// Backend key of the config object.
pub const KEY_CONFIG: &str = "config";
/// Backend prefix of key slots.
pub const PREFIX_KEYS: &str = "keys/";
/// Backend prefix of chunks.
pub const PREFIX_CHUNKS: &str = "chunks/";
/// Backend prefix of disk indexes.
pub const PREFIX_INDEXES: &str = "indexes/";
/// Backend prefix of snapshot manifests.
pub const PREFIX_SNAPSHOTS: &str = "snapshots/";

/// Backend prefix of boot-test results (`boottests/<snapshot id>/<result id>`).
pub const PREFIX_BOOT_TESTS: &str = "boottests/";
/// Boot-test result JSON version.
pub const BOOT_TEST_VERSION: u32 = 1;

/// Decompression limit for indexes and manifests (refuses zstd bombs).
pub const MAX_METADATA_OBJECT: usize = 64 * 1024 * 1024;
