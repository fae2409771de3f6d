// Tests for lib/journal.h: records (encoding, torn and foreign ones refused), reading a zone
// (checkpoint, consecutive sequence, restart at the zone's start), and the Disk's journaled
// flush rounds through power loss (FaultInjectingStore) and a failed sync.
#include "journal.h"

#include <random>

#include "block_map.h"
#include "disk_test_util.h"
#include "fsck.h"
#include "index.h"

using namespace layer;
using namespace disktest;

namespace {

journal::Rows some_rows(uint64_t seed) {
  std::mt19937_64 rng(seed);
  journal::Rows rows;
  for (uint32_t c = 0; c < 3; ++c) {
    ChunkBits bits;
    for (int i = 0; i < 50; ++i)
      bits.set(static_cast<uint32_t>(rng() % kBlocksPerChunk),
               rng() % 2 ? BlockState::kData : BlockState::kZero);
    rows.emplace_back(c * 2, encode_chunk(bits));
  }
  rows.emplace_back(7, encode_chunk(ChunkBits(BlockState::kData)));
  return rows;
}

// A zone in memory as a file: records at the offsets given.
class ZoneFile : public ForwardingFile {
 public:
  ZoneFile() : ForwardingFile(nullptr) {}
  Status read(void* buf, uint64_t len, uint64_t offset) override {
    std::memset(buf, 0, len);
    if (offset < bytes.size())
      std::memcpy(buf, bytes.data() + offset, std::min<uint64_t>(len, bytes.size() - offset));
    return {};
  }
  Result<uint64_t> size() override { return static_cast<uint64_t>(bytes.size()); }
  void put(uint64_t offset, const std::string& s) {
    if (bytes.size() < offset + s.size()) bytes.resize(offset + s.size());
    std::memcpy(bytes.data() + offset, s.data(), s.size());
  }
  std::string bytes;
};

}  // namespace

TEST_CASE("a record decodes to what was encoded; a torn or foreign one does not", "[journal]") {
  const auto rows = some_rows(1);
  const std::string rec = journal::encode_record(42, 9, rows);
  CHECK(rec.size() % journal::kRecordAlign == 0);
  auto got = journal::decode_record(rec, 9, 8);
  REQUIRE(got);
  CHECK(got->first.seq == 42);
  CHECK(got->first.rows == rows);
  CHECK(got->second == rec.size());
  CHECK_FALSE(journal::decode_record(rec, 10, 8));  // another layer's
  CHECK_FALSE(journal::decode_record(rec, 9, 7));   // a row outside the disk
  for (size_t at : {0ul, 9ul, 17ul, 30ul, 36ul, 45ul, 200ul, 1100ul, 3000ul}) {
    std::string torn = rec;
    torn[at] ^= 0x40;
    INFO("byte " << at);
    CHECK_FALSE(journal::decode_record(torn, 9, 8));
  }
  CHECK_FALSE(journal::decode_record(rec.substr(0, 1000), 9, 8));  // cut short
  CHECK_FALSE(journal::decode_record(std::string(4096, '\0'), 9, 8));
}

TEST_CASE("a zone reads from its start: past the checkpoint, consecutive records only",
          "[journal]") {
  LayerRecord layer;
  layer.id = 5;
  layer.block_size = 4096;
  layer.size_bytes = uint64_t{8} * kBlocksPerChunk * 4096;
  const uint64_t zone = journal::zone_offset(layer.size_bytes);
  ZoneFile f;
  f.bytes.resize(zone);
  auto seqs = [&](uint64_t checkpoint) {
    std::vector<uint64_t> out;
    for (const auto& r : MUST(journal::read_records(f, layer, checkpoint))) out.push_back(r.seq);
    return out;
  };
  CHECK(seqs(0).empty());  // no zone at all
  uint64_t at = 0;
  for (uint64_t s = 1; s <= 4; ++s) {
    const std::string rec = journal::encode_record(s, 5, some_rows(s));
    f.put(zone + at, rec);
    at += rec.size();
  }
  CHECK(seqs(0) == std::vector<uint64_t>{1, 2, 3, 4});
  CHECK(seqs(2) == std::vector<uint64_t>{3, 4});
  CHECK(seqs(4).empty());
  // A gap past the checkpoint (an index older than the journal): nothing is replayed.
  CHECK(seqs(7).empty());
  // Restart at the zone's start once 1..4 are folded: 5 and 6 replace 1 and part of 2; the
  // rest of 2, 3 and 4 are older and end the reading.
  f.put(zone, journal::encode_record(5, 5, {}));
  f.put(zone + journal::kRecordAlign, journal::encode_record(6, 5, some_rows(6)));
  CHECK(seqs(4) == std::vector<uint64_t>{5, 6});
  // A torn 6: only 5.
  f.bytes[zone + journal::kRecordAlign + 100] ^= 1;
  CHECK(seqs(4) == std::vector<uint64_t>{5});
  // The writer went on at the next segment's start: 7 and 8 there, and an older record after
  // them (from a cycle before) ends that segment's reading.
  f.bytes[zone + journal::kRecordAlign + 100] ^= 1;  // 6 whole again
  const uint64_t seg1 = zone + journal::kSegmentBytes;
  f.put(seg1, journal::encode_record(7, 5, some_rows(7)));
  f.put(seg1 + journal::kRecordAlign, journal::encode_record(8, 5, {}));
  f.put(seg1 + 2 * journal::kRecordAlign, journal::encode_record(2, 5, {}));
  CHECK(seqs(4) == std::vector<uint64_t>{5, 6, 7, 8});
  CHECK(seqs(5) == std::vector<uint64_t>{6, 7, 8});
  CHECK(seqs(6) == std::vector<uint64_t>{7, 8});
  // 6 lost (torn): 7 and 8 cannot follow 5.
  f.bytes[zone + journal::kRecordAlign + 100] ^= 1;
  CHECK(seqs(4) == std::vector<uint64_t>{5});
}

TEST_CASE("journaled flush rounds survive power loss; the next open folds them",
          "[journal][powerloss]") {
  const bool tear = GENERATE(false, true);
  const uint64_t seed = test::test_seed("journal power loss") * 31 + tear;
  CAPTURE(tear, seed);
  std::mt19937_64 rng(seed);
  const uint64_t blocks = 128;
  const uint64_t size = blocks * 4096;
  DiskFixture d(size, size, 4096, seed);
  FaultInjectingStore* faults = install_store<FaultInjectingStore>(*d.f.pool);
  Model m = d.model;
  auto disk = d.open();
  // Many rounds: the first commits to the index and opens the journal; the others journal.
  for (int round = 0; round < 40; ++round) {
    for (int i = 0; i < 4; ++i) {
      const uint64_t b = rng() % (blocks - 3);  // room for the longest request below
      switch (rng() % 4) {
        case 0:
          do_write(*disk, m, b * 4096, pattern(4096, rng()));
          break;
        case 1:
          do_write(*disk, m, b * 4096 + rng() % 4096, pattern(1 + rng() % 5000, rng()));
          break;
        case 2:
          do_zero(*disk, m, b * 4096, 4096);
          break;
        default:
          do_trim(*disk, m, b * 4096 + 100, 9000);
          break;
      }
    }
    REQUIRE_OK(disk->flush());
  }
  {
    auto txn = MUST(d.f.pool->index().begin_read());
    const auto c = MUST(d.f.pool->inspect("c")).container;
    const auto st = MUST(journal::get_state(txn, c.delta_layer));
    CHECK(st.open);
  }
  // Crash right after the last acknowledged flush: the Disk goes, then the power.
  disk.reset();
  faults->simulate_power_loss(tear, seed);
  // What a restarted server's pool finds: the journal folded at open.
  d.f.reopen();
  faults = install_store<FaultInjectingStore>(*d.f.pool);
  {
    auto txn = MUST(d.f.pool->index().begin_read());
    const auto c = MUST(d.f.pool->inspect("c")).container;
    CHECK_FALSE(MUST(journal::get_state(txn, c.delta_layer)).open);
  }
  FsckReport rep = MUST(fsck(*d.f.pool, false, false));
  INFO(rep.problems.size() << " problems, first: "
                           << (rep.problems.empty() ? "" : rep.problems[0]));
  CHECK(rep.problems.empty());
  disk = d.open();
  check_disk(*disk, m);
  check_extents(*disk, m, 0, size);
  // And it journals on, across segments: a round per write, more records than a segment holds.
  for (int i = 0; i < 700; ++i) {
    do_write(*disk, m, (rng() % blocks) * 4096, pattern(4096, rng()));
    REQUIRE_OK(disk->flush());
  }
  do_write(*disk, m, 3 * 4096, pattern(4096, 77));
  REQUIRE_OK(disk->flush());
  do_write(*disk, m, 9 * 4096 + 7, pattern(100, 78));
  REQUIRE_OK(disk->flush());
  disk.reset();
  faults->simulate_power_loss(tear, seed + 1);
  disk = d.open();  // this time the open of the disk itself recovers
  check_disk(*disk, m);
}

TEST_CASE("a journal record whose sync fails is never replayed, and the disk stops",
          "[journal][powerloss]") {
  const uint64_t size = 64 * 4096;
  DiskFixture d(size, size, 4096, 5);
  FaultInjectingStore* faults = install_store<FaultInjectingStore>(*d.f.pool);
  Model m = d.model;
  auto disk = d.open();
  do_write(*disk, m, 0, pattern(4096, 1));
  REQUIRE_OK(disk->flush());  // commits, opens the journal
  do_write(*disk, m, 4096 + 10, pattern(100, 2));
  REQUIRE_OK(disk->flush());  // journaled
  Model before = m;
  std::vector<uint8_t> data = pattern(4096, 3);
  REQUIRE_OK(disk->write(data.data(), data.size(), 8 * 4096, false));
  int syncs = 0;
  disk->set_test_hook([&](std::string_view point) {
    if (point == "journal.written") faults->fail_next_syncs(1), ++syncs;
  });
  auto st = disk->flush();
  REQUIRE_FALSE(st.ok());
  CHECK(st.error().code == EIO);
  CHECK(syncs == 1);
  disk->set_test_hook(nullptr);
  CHECK_FALSE(disk->flush().ok());  // broken until reopened
  disk.reset();
  faults->simulate_power_loss(false, 1);
  disk = d.open();
  // Block 8's write was never acknowledged: its data was synced, but the record naming it was
  // undone with its failed sync, so it reads as before.
  check_disk(*disk, before);
}

TEST_CASE("a clean close folds the journal and closes it", "[journal]") {
  const uint64_t size = 64 * 4096;
  DiskFixture d(size, size, 4096, 8);
  Model m = d.model;
  DiskTable table(*d.f.pool);
  auto disk = MUST(table.acquire("c", true));
  for (int i = 0; i < 5; ++i) {
    do_write(*disk, m, static_cast<uint64_t>(i) * 4096 * 3 + 5, pattern(7000, i));
    REQUIRE_OK(disk->flush());
  }
  const LayerId delta = MUST(d.f.pool->inspect("c")).container.delta_layer;
  REQUIRE_OK(table.release(std::move(disk)));
  auto txn = MUST(d.f.pool->index().begin_read());
  const auto st = MUST(journal::get_state(txn, delta));
  CHECK_FALSE(st.open);
  CHECK(st.checkpoint >= 4);  // the first round committed; the next four journaled
  // The index alone describes the disk: the data blocks written are in its rows.
  const auto info = MUST(d.f.pool->inspect("c"));
  CHECK(info.delta_data_blocks > 0);
}
