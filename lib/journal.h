// journal.h — a writable delta's map journal: flush rounds append the map rows they make
// durable to a zone of the delta's own file, past the disk's end, instead of committing them
// to LMDB on the acknowledgement path (DESIGN.md "Durability"; docs/design.md "The journal").
//
// Layout: the zone starts at zone_offset(size_bytes) (the disk's end rounded up to 1 MiB) and
// holds at most kZoneBytes. A record is one flush round's rows, at a 4 KiB-aligned offset:
//   header (40 bytes, little-endian): magic "LAYERJNL" | seq u64 | layer id u64 |
//     payload bytes u32 | rows u32 | xxh3-64 of the header (this field 0) and the payload
//   payload: rows × { chunk u32 | row bytes u16 | row (1 or kChunkBytes bytes) }
// Sequence numbers grow by one per record over the delta's whole life. The index keeps, per
// delta, a `meta` row "journal.<id>" = { checkpoint u64 | open u8 }: every record up to the
// checkpoint is folded into the `maps` rows; open says records past it may exist (a server
// journals into the file).
// The zone is kSegments segments of kSegmentBytes. The writer appends records to one segment
// and, when the next record does not fit, goes on at the start of the next segment — only if
// every record in that one is folded (otherwise the round commits to the index instead). So
// read from a segment's start, a segment holds consecutive records, newest first written,
// then bytes that are not the next record (older records, a torn one, zeroes); and the records
// past the checkpoint, gathered from every segment, are consecutive from checkpoint + 1. Under
// a steady stream of flushes the writer cycles through the segments, whose blocks the first
// record of an open journal allocates by writing the whole zone (zeroes): a record's sync then
// writes data only, with no filesystem metadata to commit (measured: an fdatasync after a
// write into a hole costs what the data's own allocating fdatasync does, ~0.4 ms here; one
// after an overwrite about half that). The zone (1 MiB) is punched when the journal closes.
// Ordering (a round): the delta's data fdatasync, then the record's write and a second
// fdatasync of the same file: a record is durable only after every write whose mark it holds,
// as an LMDB commit is in the classic round. The fold (one LMDB transaction of the rows and
// the checkpoint) runs later, off the acknowledgement path.
//
// Thread-safety: free functions; callers serialise per delta (the Disk's rounds, or the
// layer's exclusive lock for recovery).
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "error.h"
#include "layer_file.h"
#include "records.h"

namespace layer {

class Pool;
class ReadTxn;
class WriteTxn;

namespace journal {

constexpr uint64_t kZoneAlign = uint64_t{1} << 20;
constexpr uint64_t kSegmentBytes = uint64_t{128} << 10;
constexpr uint64_t kSegments = 8;
constexpr uint64_t kZoneBytes = kSegmentBytes * kSegments;
constexpr uint64_t kRecordAlign = 4096;
constexpr size_t kHeaderBytes = 40;

// Where a delta's zone starts: its disk's end rounded up to kZoneAlign.
constexpr uint64_t zone_offset(uint64_t size_bytes) {
  return (size_bytes + kZoneAlign - 1) / kZoneAlign * kZoneAlign;
}
// The largest size a layer's file may have: its disk, plus a journal zone (fsck, checks).
constexpr uint64_t max_file_size(uint64_t size_bytes) {
  return zone_offset(size_bytes) + kZoneBytes;
}

using Rows = std::vector<std::pair<uint32_t, std::string>>;  // (chunk, `maps` row value)

// One record, padded with zeroes to a multiple of kRecordAlign.
std::string encode_record(uint64_t seq, LayerId layer, const Rows& rows);

struct Record {
  uint64_t seq = 0;
  Rows rows;
};
// Decodes the record at the start of `bytes` (which holds at least its header). Returns the
// record and its padded length, std::nullopt when it is no valid record of `layer` with rows
// inside a disk of `nchunks` chunks (wrong magic, layer or checksum, a bad row, or `bytes` too
// short for its payload).
std::optional<std::pair<Record, uint64_t>> decode_record(std::string_view bytes, LayerId layer,
                                                         uint64_t nchunks);

// The `meta` row of a delta's journal.
struct State {
  uint64_t checkpoint = 0;  // last record folded into the maps rows
  bool open = false;        // records past the checkpoint may exist in the zone
};
std::string key(LayerId layer);
constexpr std::string_view kKeyPrefix = "journal.";
std::string encode_state(const State& s);
// Errors: EIO for a malformed value.
Result<State> decode_state(std::string_view value);
// The delta's state; all zero without a row. Errors: EIO.
Result<State> get_state(ReadTxn& txn, LayerId layer);

// The records of `file`'s zone past `checkpoint`, in order: each segment read from its start
// as the layout above says, then the consecutive run from checkpoint + 1 (none when there is
// no checkpoint + 1: an index older than the journal). Errors: EIO (a read failed).
Result<std::vector<Record>> read_records(LayerFile& file, const LayerRecord& layer,
                                         uint64_t checkpoint);

// Writes `rows` (latest per chunk) as `maps` rows of `layer` in txn: a uniform-absent row is
// a deletion, as in a flush round.
Status put_rows(WriteTxn& txn, LayerId layer, const Rows& rows);

// Folds the journal of writable delta `layer` into the index if its state says open: its
// records past the checkpoint are written as maps rows with the new checkpoint in one
// transaction, the state closed, and the zone punched. REQUIRES: the caller holds the layer's
// lock exclusively (no server journals into it). Returns the records replayed.
// Errors: EIO (read, or a bad state row), those of the commit.
Result<uint64_t> recover(Pool& pool, LayerId layer);

// Before an offline change reads container `c`'s delta from the index (snapshot, commit,
// rollback): recovers its journal if it is open and no one holds the delta's lock. A
// process's own Disk closes its journal before such a change (Disk::quiesce), so this finds
// it closed. Errors: EBUSY (open, and the delta's lock is held: a server journals into it),
// those of recover.
Status recover_delta(Pool& pool, LayerId delta);

// Recovers every delta whose journal is open and whose layer lock is free (its server is
// gone); skips the others. Best effort: returns how many it recovered; failures are skipped
// (the next writable open of the container recovers it).
uint64_t recover_all(Pool& pool);

}  // namespace journal
}  // namespace layer
