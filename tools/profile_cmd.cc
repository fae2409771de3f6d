// profile_cmd.cc — `layer image profile`: an image's boot profile from the index (meta
// `boot.` + ref), or its deletion.
#include "profile_cmd.h"

#include <fmt/format.h>

#include <iostream>
#include <optional>
#include <vector>

#include "boot_profile.h"
#include "names.h"
#include "output.h"
#include "pool.h"

namespace layer_cli {
namespace {

using layer::BootProfile;
using layer::make_error;
using layer::Result;

struct Target {
  layer::ImageRecord image;
  std::optional<BootProfile> profile;  // none, or one of the image's current top layer
};

json profile_json(const Target& t) {
  json j = {{"image", t.image.ref}, {"top_layer", t.image.top_layer}};
  if (!t.profile) {
    j["profile"] = nullptr;
    return j;
  }
  const BootProfile& p = *t.profile;
  json layers = json::array();
  for (const auto& [id, ranges] : p.layers) {
    json rs = json::array();
    for (const auto& r : ranges) rs.push_back({r.offset, r.length});
    layers.push_back({{"layer", id},
                      {"range_count", ranges.size()},
                      {"bytes", layer::ranges_bytes(ranges)},
                      {"ranges", std::move(rs)}});
  }
  j["profile"] = {{"boots", p.boots},
                  {"range_count", p.range_count()},
                  {"bytes", p.bytes()},
                  {"updated", p.updated_unix},
                  {"layers", std::move(layers)}};
  return j;
}

void print_text(const Target& t, bool with_ranges) {
  if (!t.profile) {
    std::cout << fmt::format(
        "image {}: no boot profile yet (a fresh clone's first boot records it)\n", t.image.ref);
    return;
  }
  const BootProfile& p = *t.profile;
  std::cout << fmt::format("image {}: boot profile of {} boot{}, {} range{}, {}, updated {}\n",
                           t.image.ref, p.boots, p.boots == 1 ? "" : "s", p.range_count(),
                           p.range_count() == 1 ? "" : "s", human_size(p.bytes()),
                           format_time(p.updated_unix));
  std::vector<std::vector<std::string>> rows = {{"LAYER", "RANGES", "BYTES"}};
  for (const auto& [id, ranges] : p.layers)
    rows.push_back({std::to_string(id), std::to_string(ranges.size()),
                    human_size(layer::ranges_bytes(ranges))});
  print_table(rows);
  if (!with_ranges) return;
  std::vector<std::vector<std::string>> list = {{"LAYER", "OFFSET", "LENGTH"}};
  for (const auto& [id, ranges] : p.layers)
    for (const auto& r : ranges)
      list.push_back({std::to_string(id), std::to_string(r.offset), std::to_string(r.length)});
  print_table(list);
}

}  // namespace

std::string boot_event_text(const nlohmann::ordered_json& l) {
  const std::string event = l.value("event", std::string());
  if (event != "boot-profile" && event != "boot-prefetch") return "";
  const std::string image = layer::escape_control(l.value("image", std::string()));
  const uint64_t bytes = l.value("bytes", uint64_t{0});
  std::string text =
      event == "boot-prefetch"
          ? fmt::format("read ahead {} of {} in {} ms{}", human_size(bytes), image,
                        l.value("ms", uint64_t{0}), l.value("complete", true) ? "" : ", stopped")
          : fmt::format("recorded {} of {} ({} ranges), profile {} boots, {}", human_size(bytes),
                        image, l.value("ranges", uint64_t{0}), l.value("boots", uint64_t{0}),
                        human_size(l.value("profile_bytes", uint64_t{0})));
  if (l.contains("error") && l["error"].is_string())
    text += ": " + layer::escape_control(l["error"].get<std::string>());
  return text;
}

Result<int> run_image_profile(const std::string& pool_root, bool as_json, const ProfileArgs& args) {
  const bool one = args.image.find(':') != std::string::npos;
  if (one)
    LAYER_TRY(layer::validate_image_ref(args.image));
  else
    LAYER_TRY(layer::validate_name(args.image, "image name"));
  LAYER_ASSIGN(auto pool, layer::Pool::open(pool_root, {.read_only = !args.clear}));
  std::vector<Target> targets;
  {
    LAYER_ASSIGN(auto txn, pool->index().begin_read());
    const std::string prefix = one ? args.image : args.image + ":";
    LAYER_TRY(txn.scan(layer::Db::kImages, prefix,
                       [&](std::string_view k, std::string_view v) -> Result<bool> {
                         if (one && k != args.image) return true;
                         LAYER_ASSIGN(auto image, layer::decode_image(v, k));
                         targets.push_back({std::move(image), std::nullopt});
                         return true;
                       }));
    if (targets.empty())
      return make_error(ENOENT, "image {}{} not found in pool {}", args.image, one ? "" : ":*",
                        pool->paths().root);
    for (auto& t : targets) {
      LAYER_ASSIGN(t.profile, layer::read_boot_profile(txn, t.image.ref));
      // A profile of an older top layer (the ref was removed and imported again) is stale.
      if (t.profile && t.profile->top_layer != t.image.top_layer) t.profile.reset();
    }
  }
  if (args.clear) {
    json out = json::array();
    for (const auto& t : targets) {
      LAYER_ASSIGN(bool existed, layer::clear_boot_profile(*pool, t.image.ref));
      if (as_json)
        out.push_back({{"image", t.image.ref}, {"cleared", existed}});
      else
        std::cout << (existed ? fmt::format("image {}: boot profile cleared\n", t.image.ref)
                              : fmt::format("image {}: no boot profile\n", t.image.ref));
    }
    if (as_json) {
      json j = {{"ok", true}, {"images", std::move(out)}};
      std::cout << j.dump(-1, ' ', false, json::error_handler_t::replace) << '\n';
    }
    return 0;
  }
  if (as_json) {
    json j = {{"ok", true}};
    if (one) {
      j.update(profile_json(targets[0]));
    } else {
      json all = json::array();
      for (const auto& t : targets) all.push_back(profile_json(t));
      j["images"] = std::move(all);
    }
    std::cout << j.dump(-1, ' ', false, json::error_handler_t::replace) << '\n';
    return 0;
  }
  for (const auto& t : targets) print_text(t, args.ranges);
  return 0;
}

}  // namespace layer_cli
