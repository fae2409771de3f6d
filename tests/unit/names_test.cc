// Unit tests for lib/names.h: names, image refs, snapshot refs and sizes.
#include "names.h"

#include "test_util.h"

using namespace layer;

TEST_CASE("validate_name accepts the documented names only", "[names]") {
  for (const char* ok :
       {"a", "0", "web-1", "web_1", "a.b", "debian", "x9", "a-", "a.", "a_b.c-d"}) {
    INFO("name \"" << ok << "\"");
    REQUIRE_OK(validate_name(ok, "container name"));
  }
  REQUIRE_OK(validate_name(std::string(64, 'a'), "container name"));
  for (const std::string bad : {"", "A", "Web", "../x", "..", ".", "a..b", "-a", ".a", "_a", "a/b",
                                "/a", "a b", "a:b", "a\nb", "é", "a\\b", "a*"}) {
    INFO("name \"" << bad << "\"");
    auto st = validate_name(bad, "container name");
    REQUIRE_FALSE(st.ok());
    CHECK(st.error().code == EINVAL);
    CHECK_THAT(st.error().message, Catch::Contains("container name"));
  }
  REQUIRE_ERRNO(validate_name(std::string(65, 'a'), "container name"), EINVAL);
  REQUIRE_ERRNO(validate_name(std::string("a\0b", 3), "container name"), EINVAL);
}

TEST_CASE("validate_image_ref wants name:version", "[names]") {
  for (const char* ok : {"debian:12.1", "debian:12", "busybox:1", "a:b", "web-1:v2_3"}) {
    INFO("ref \"" << ok << "\"");
    REQUIRE_OK(validate_image_ref(ok));
  }
  for (const char* bad : {"", "debian", ":12", "debian:", "Debian:12", "debian:A", "a:b:c",
                          "../x:1", "debian:../x", "debian:1..2", "de bian:1", "debian:1/2"}) {
    INFO("ref \"" << bad << "\"");
    REQUIRE_ERRNO(validate_image_ref(bad), EINVAL);
  }
}

TEST_CASE("parse_size", "[names]") {
  CHECK(MUST(parse_size("0")) == 0);
  CHECK(MUST(parse_size("511")) == 511);
  CHECK(MUST(parse_size("512")) == 512);
  CHECK(MUST(parse_size("4096")) == 4096);
  CHECK(MUST(parse_size("1K")) == 1024);
  CHECK(MUST(parse_size("512M")) == 512ULL << 20);
  CHECK(MUST(parse_size("10G")) == 10ULL << 30);
  CHECK(MUST(parse_size("1T")) == 1ULL << 40);
  CHECK(MUST(parse_size("16383T")) == 16383ULL << 40);
  for (const char* bad : {"", "G", "1.5G", "-1", "+1", "10X", "abc", "10 G", " 10G", "10G ", "0x10",
                          "1e3", "99999999999999999999", "16777216T", "10GG"}) {
    INFO("size \"" << bad << "\"");
    REQUIRE_ERRNO(parse_size(bad), EINVAL);
  }
}

TEST_CASE("parse_snapshot_ref splits CONTAINER@SNAP and checks both names", "[names]") {
  CHECK_FALSE(MUST(parse_snapshot_ref("web1")).has_value());
  auto ref = MUST(parse_snapshot_ref("web1@before-upgrade"));
  REQUIRE(ref.has_value());
  CHECK(ref->first == "web1");
  CHECK(ref->second == "before-upgrade");
  for (const char* bad : {"@s", "web1@", "Web@s", "web1@S", "web1@a@b", "web1@../x"}) {
    INFO("ref \"" << bad << "\"");
    REQUIRE_ERRNO(parse_snapshot_ref(bad), EINVAL);
  }
  auto st = validate_snapshot_name("a b");
  REQUIRE_FALSE(st.ok());
  CHECK_THAT(st.error().message, Catch::Contains("snapshot name"));
}

TEST_CASE("escape_control", "[names]") {
  CHECK(escape_control("c1") == "c1");
  CHECK(escape_control("") == "");
  CHECK(escape_control("c1\nforged: line") == "c1\\x0aforged: line");
  CHECK(escape_control(std::string_view("a\0b", 3)) == "a\\x00b");
  CHECK(escape_control("\t\x7f\x1b[0m") == "\\x09\\x7f\\x1b[0m");
  CHECK(escape_control("c1\xc3\xa9") == "c1\xc3\xa9");  // UTF-8 passes
}

TEST_CASE("labels: keys of a-z A-Z 0-9 . _ / -, values of printable UTF-8", "[names]") {
  CHECK(layer::validate_label("role", "web").ok());
  CHECK(layer::validate_label("team/owner", "").ok());
  CHECK(layer::validate_label("A.b_c-9", std::string(256, 'x')).ok());
  CHECK(layer::validate_label(std::string(63, 'k'), "ünïcode ✓").ok());
  CHECK_ERRNO(layer::validate_label("", "v"), EINVAL);
  CHECK_ERRNO(layer::validate_label(std::string(64, 'k'), "v"), EINVAL);
  CHECK_ERRNO(layer::validate_label("-x", "v"), EINVAL);
  CHECK_ERRNO(layer::validate_label("a b", "v"), EINVAL);
  CHECK_ERRNO(layer::validate_label("k", std::string(257, 'x')), EINVAL);
  CHECK_ERRNO(layer::validate_label("k", "a\nb"), EINVAL);
  CHECK_ERRNO(layer::validate_label("k", "a\x7f"), EINVAL);
  CHECK_ERRNO(layer::validate_label("k", "\xff"), EINVAL);
  CHECK_ERRNO(layer::validate_label("k", "\xc3"), EINVAL);  // a lead byte alone
}
