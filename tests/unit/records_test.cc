// Unit tests for lib/records.h: encode/decode round trips, and untrusted bytes (truncated,
// extended, garbage) giving EIO, never a crash.
#include "records.h"

#include "test_util.h"

using namespace layer;

namespace {

LayerRecord sample_layer() {
  LayerRecord r;
  r.id = 0x0102030405060708ULL;
  r.parent = 42;
  r.tier = Tier::kHdd;
  r.size_bytes = (64ULL << 30) + 512;
  r.block_size = 65536;
  r.state = LayerState::kFrozenUnhashed;
  r.refcount = 0xDEADBEEF;
  r.created_unix = 1700000000;
  return r;
}

ImageRecord sample_image() {
  ImageRecord r;
  r.ref = "debian:12.1";
  r.top_layer = 0xFFFFFFFFFFFFFFF0ULL;
  r.size_bytes = 10ULL << 30;
  r.block_size = 4096;
  r.created_unix = 1;
  r.description = std::string("a description with\0a nul and \xff bytes", 37);
  return r;
}

ContainerRecord sample_container() {
  ContainerRecord r;
  r.name = "web-1";
  r.id = 77;
  r.image_ref = "busybox:1";
  r.delta_layer = 9;
  r.size_bytes = 1ULL << 40;
  r.block_size = 1 << 20;
  r.created_unix = 1234567890123ULL;
  r.generation = 3;
  r.labels = {{"env", "prod"}, {"owner", ""}, {"", "empty key"}, {"k", std::string(300, 'v')}};
  AccessRule a;
  a.subject = AccessRule::Subject::kUid;
  a.id = 1000;
  a.label = "user:alice";
  a.read_only = true;
  AccessRule b;
  b.subject = AccessRule::Subject::kAddr;
  b.addr = "10.0.0.0/8";
  b.label = "addr:10.0.0.0/8";
  b.deny = true;
  r.access = {a, b};
  return r;
}

IntentRecord sample_intent() {
  IntentRecord r;
  r.kind = IntentRecord::Kind::kImport;
  r.layer = 5;
  r.target = "alpine:3.19";
  r.created_unix = 99;
  return r;
}

void check_equal(const LayerRecord& a, const LayerRecord& b) {
  CHECK(a.id == b.id);
  CHECK(a.parent == b.parent);
  CHECK(a.tier == b.tier);
  CHECK(a.size_bytes == b.size_bytes);
  CHECK(a.block_size == b.block_size);
  CHECK(a.state == b.state);
  CHECK(a.refcount == b.refcount);
  CHECK(a.created_unix == b.created_unix);
}
void check_equal(const ImageRecord& a, const ImageRecord& b) {
  CHECK(a.ref == b.ref);
  CHECK(a.top_layer == b.top_layer);
  CHECK(a.size_bytes == b.size_bytes);
  CHECK(a.block_size == b.block_size);
  CHECK(a.created_unix == b.created_unix);
  CHECK(a.description == b.description);
}
void check_equal(const ContainerRecord& a, const ContainerRecord& b) {
  CHECK(a.name == b.name);
  CHECK(a.id == b.id);
  CHECK(a.image_ref == b.image_ref);
  CHECK(a.delta_layer == b.delta_layer);
  CHECK(a.size_bytes == b.size_bytes);
  CHECK(a.block_size == b.block_size);
  CHECK(a.created_unix == b.created_unix);
  CHECK(a.generation == b.generation);
  CHECK(a.labels == b.labels);
  REQUIRE(a.access.size() == b.access.size());
  for (size_t i = 0; i < a.access.size(); ++i) {
    CHECK(a.access[i].subject == b.access[i].subject);
    CHECK(a.access[i].id == b.access[i].id);
    CHECK(a.access[i].addr == b.access[i].addr);
    CHECK(a.access[i].deny == b.access[i].deny);
    CHECK(a.access[i].read_only == b.access[i].read_only);
    CHECK(a.access[i].label == b.access[i].label);
  }
}
void check_equal(const IntentRecord& a, const IntentRecord& b) {
  CHECK(a.kind == b.kind);
  CHECK(a.layer == b.layer);
  CHECK(a.target == b.target);
  CHECK(a.created_unix == b.created_unix);
}

// Every damaged variant of `good` must decode to a value or to EIO; the ones that are
// certainly invalid (shorter or longer than the record) must be EIO and name `key`, except a
// truncation to `older_layout` bytes (when not 0): a record written before its last field was
// added, which decodes.
template <typename Decode>
void check_untrusted(const std::string& good, Decode decode, const std::string& key, uint64_t seed,
                     size_t older_layout = 0) {
  for (size_t n = 0; n < good.size(); n++) {
    INFO("truncated to " << n << " of " << good.size() << " bytes");
    auto r = decode(std::string_view(good.data(), n));
    if (older_layout != 0 && n == older_layout) {
      CHECK(r.ok());
      continue;
    }
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().code == EIO);
    if (n > 0 && !key.empty()) CHECK_THAT(r.error().message, Catch::Contains(key));
  }
  for (const std::string& tail :
       {std::string(1, '\0'), std::string("junk"), std::string(64, 'x')}) {
    INFO("extended by " << tail.size() << " bytes");
    auto r = decode(good + tail);
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().code == EIO);
  }
  // An unknown record version.
  {
    std::string bad = good;
    bad[0] = static_cast<char>(0xEE);
    auto r = decode(bad);
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().code == EIO);
  }
  // Every single byte set to 0xFF or 0x00 (e.g. a string length prefix becoming huge, an enum
  // out of range): either a value or EIO.
  for (size_t i = 0; i < good.size(); i++) {
    for (char v : {'\xff', '\0', '\x7f'}) {
      std::string bad = good;
      bad[i] = v;
      auto r = decode(bad);
      if (!r.ok()) {
        INFO("byte " << i << " set to " << int(static_cast<uint8_t>(v)) << ": "
                     << test::describe(r.error()));
        CHECK(r.error().code == EIO);
      }
    }
  }
  // Random garbage of every length up to twice the record.
  std::mt19937_64 rng(seed);
  for (int iter = 0; iter < 2000; iter++) {
    std::string bad = good;
    if (iter % 2 == 0) {
      auto bytes = test::random_bytes(rng, rng() % (2 * good.size() + 1));
      bad.assign(bytes.begin(), bytes.end());
    } else {
      for (int k = 0; k < 3; k++) bad[rng() % bad.size()] = static_cast<char>(rng());
    }
    auto r = decode(bad);
    if (!r.ok()) {
      INFO("garbage iteration " << iter << ": " << test::describe(r.error()));
      CHECK(r.error().code == EIO);
    }
  }
}

}  // namespace

TEST_CASE("LayerRecord round trip", "[records]") {
  for (LayerState st : {LayerState::kWritable, LayerState::kFrozenUnhashed, LayerState::kFrozen}) {
    for (Tier tier : {Tier::kSsd, Tier::kHdd}) {
      LayerRecord r = sample_layer();
      r.state = st;
      r.tier = tier;
      LayerRecord back = MUST(decode_layer(encode(r), r.id));
      check_equal(back, r);
    }
  }
  LayerRecord zero;
  zero.id = 1;
  check_equal(MUST(decode_layer(encode(zero), 1)), zero);
  CHECK(std::string(to_string(LayerState::kWritable)) != to_string(LayerState::kFrozen));
  CHECK(std::string(to_string(Tier::kSsd)) == "ssd");
  CHECK(std::string(to_string(Tier::kHdd)) == "hdd");
}

TEST_CASE("LayerRecord: damaged bytes give EIO", "[records]") {
  const uint64_t seed = test::test_seed("records layer garbage");
  CAPTURE(seed);
  const LayerRecord r = sample_layer();
  check_untrusted(
      encode(r), [&](std::string_view b) { return decode_layer(b, r.id); }, std::to_string(r.id),
      seed);
}

TEST_CASE("ImageRecord round trip", "[records]") {
  ImageRecord r = sample_image();
  check_equal(MUST(decode_image(encode(r), r.ref)), r);
  ImageRecord empty_desc = r;
  empty_desc.description.clear();
  check_equal(MUST(decode_image(encode(empty_desc), r.ref)), empty_desc);
}

TEST_CASE("ImageRecord: damaged bytes give EIO", "[records]") {
  const uint64_t seed = test::test_seed("records image garbage");
  CAPTURE(seed);
  const ImageRecord r = sample_image();
  check_untrusted(
      encode(r), [&](std::string_view b) { return decode_image(b, "img:7"); }, "img:7", seed);
}

TEST_CASE("ContainerRecord round trip, with and without labels", "[records]") {
  ContainerRecord r = sample_container();
  check_equal(MUST(decode_container(encode(r), r.name)), r);
  ContainerRecord bare = r;
  bare.labels.clear();
  ContainerRecord back = MUST(decode_container(encode(bare), bare.name));
  check_equal(back, bare);
  CHECK(back.labels.empty());
  // Labels change the encoding.
  CHECK(encode(bare) != encode(r));
}

TEST_CASE("ContainerRecord: damaged bytes give EIO", "[records]") {
  const uint64_t seed = test::test_seed("records container garbage");
  CAPTURE(seed);
  const ContainerRecord r = sample_container();
  ContainerRecord no_rules = r;
  no_rules.access.clear();
  // Without the access rules' count (4 bytes) and rules: the layout before they were added.
  const size_t older = encode(no_rules).size() - 4;
  check_untrusted(
      encode(r), [&](std::string_view b) { return decode_container(b, "cname"); }, "cname", seed,
      older);
  const ContainerRecord old = MUST(decode_container(encode(r).substr(0, older), "cname"));
  CHECK(old.access.empty());
  CHECK(old.labels == r.labels);
  std::string bad = encode(r);
  bad[older + 4] = 9;  // the first rule's subject
  CHECK(decode_container(bad, "cname").error().code == EIO);
}

TEST_CASE("IntentRecord round trip", "[records]") {
  IntentRecord r = sample_intent();
  check_equal(MUST(decode_intent(encode(r), 12)), r);
}

TEST_CASE("IntentRecord: damaged bytes give EIO", "[records]") {
  const uint64_t seed = test::test_seed("records intent garbage");
  CAPTURE(seed);
  const IntentRecord r = sample_intent();
  check_untrusted(
      encode(r), [&](std::string_view b) { return decode_intent(b, 31337); }, "31337", seed);
}

TEST_CASE("sums round trip", "[records]") {
  for (size_t n : {0u, 1u, 2u, 63u, 64u}) {
    INFO(n << " sums");
    std::vector<uint64_t> sums(n);
    for (size_t i = 0; i < n; i++) sums[i] = (i % 3 == 0) ? 0 : 0x9E3779B97F4A7C15ULL * (i + 1);
    std::vector<uint64_t> back = MUST(decode_sums(encode_sums(sums)));
    CHECK(back == sums);
  }
}

TEST_CASE("sums: damaged bytes give EIO", "[records]") {
  std::vector<uint64_t> sums(10);
  for (size_t i = 0; i < sums.size(); i++) sums[i] = i * 1000003 + 1;
  const std::string good = encode_sums(sums);
  for (size_t cut : {size_t{1}, size_t{3}, size_t{7}}) {
    INFO("cut " << cut << " bytes");
    REQUIRE_ERRNO(decode_sums(std::string_view(good.data(), good.size() - cut)), EIO);
  }
  for (size_t extra : {size_t{1}, size_t{5}}) {
    INFO("extended by " << extra << " bytes");
    REQUIRE_ERRNO(decode_sums(good + std::string(extra, '\x01')), EIO);
  }
  // Random garbage: a value or EIO.
  std::mt19937_64 rng(7);
  for (int iter = 0; iter < 1000; iter++) {
    auto bytes = test::random_bytes(rng, rng() % 1100);
    auto r =
        decode_sums(std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()));
    if (!r.ok())
      CHECK(r.error().code == EIO);
    else
      CHECK(r->size() <= kSumsPerRow);
  }
}
