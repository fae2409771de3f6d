// profile_cmd.h — `layer image profile IMAGE [--clear]`: an image's boot profile, what fresh
// clones of it read in their first seconds (lib/boot_profile.h; docs/cli.md), registered by
// layer.cc.
#pragma once

#include <nlohmann/json.hpp>
#include <string>

#include "error.h"

namespace layer_cli {

struct ProfileArgs {
  std::string image;  // NAME:VER, or NAME: every version of NAME
  bool clear = false;
  bool ranges = false;  // the text output lists every range too
};

// Shows (or with `clear` deletes) the boot profile of image args.image, or of every version of
// it when no version is given, on the pool at pool_root; JSON with `json`. An image without a
// profile shows none (exit 0). Errors: EINVAL (a bad name), ENOENT (no such image), EACCES (a
// read-only pool with --clear), those of the index.
layer::Result<int> run_image_profile(const std::string& pool_root, bool json,
                                     const ProfileArgs& args);

// `layer audit`'s WHY column for a boot-profile or boot-prefetch line of the audit trail
// ("recorded 16.0 KiB of img:1 (2 ranges), profile 3 boots, 2.1 MiB", "read ahead 2.1 MiB of
// img:1 in 5 ms"); "" for other lines.
std::string boot_event_text(const nlohmann::ordered_json& line);

}  // namespace layer_cli
