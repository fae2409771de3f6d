// profile_cmd.h — `layer image profile IMAGE [--clear]`: an image's boot profile, what fresh
// clones of it read in their first seconds (lib/boot_profile.h; docs/cli.md), registered by
// layer.cc.
#pragma once

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

}  // namespace layer_cli
