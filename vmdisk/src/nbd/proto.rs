//! NBD protocol constants, copied from the specification
//! (`NetworkBlockDevice/nbd`, `doc/proto.md`, section "Values" and the message layouts).
//!
//! DO NOT MODIFY: these values are fixed by the wire protocol; changing one breaks
//! interoperability with every server. Add new constants only from the spec.
#![allow(missing_docs)]

// ---- Handshake magics ----------------------------------------------------------------
/// ASCII "NBDMAGIC", first 8 bytes sent by the server.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// ASCII "IHAVEOPT": newstyle magic from the server, and prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic prefix of every option reply (fixed newstyle).
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Oldstyle magic (`cliserv_magic`); not supported, recognised only to report it.
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;

// ---- Handshake flags (server, 16 bits) ----------------------------------------------
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
// ---- Client flags (32 bits) ---------------------------------------------------------
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---- Transmission flags (16 bits) ---------------------------------------------------
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ---- Options ------------------------------------------------------------------------
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// ---- Option reply types -------------------------------------------------------------
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
/// Bit 31 marks an error reply.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR + 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR + 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR + 3;
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR + 4;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR + 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR + 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR + 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR + 8;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR + 9;

// ---- NBD_REP_INFO information types (16 bits) ---------------------------------------
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---- Transmission: requests ---------------------------------------------------------
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// ---- Transmission: replies ----------------------------------------------------------
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const REPLY_FLAG_DONE: u16 = 1 << 0;

pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Bit 15 marks an error chunk.
pub const REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_FLAG_ERROR + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_FLAG_ERROR + 2;

// ---- Error values -------------------------------------------------------------------
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

// ---- Metadata contexts --------------------------------------------------------------
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
/// Prefix of qemu's dirty bitmap contexts (`qemu:dirty-bitmap:NAME`).
pub const CONTEXT_QEMU_DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

// ---- Sizes --------------------------------------------------------------------------
/// Request header: magic 4 + flags 2 + type 2 + cookie 8 + offset 8 + length 4.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Simple reply: magic 4 + error 4 + cookie 8.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Structured reply chunk header: magic 4 + flags 2 + type 2 + cookie 8 + length 4.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Option reply header: magic 8 + option 4 + type 4 + length 4.
pub const OPT_REPLY_HEADER_LEN: usize = 20;
/// Longest string the spec allows (export names, error messages).
pub const MAX_STRING_LEN: usize = 4096;
