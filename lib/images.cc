// images.cc — image listing and removal.
#include "images.h"

#include <map>

#include "boot_profile.h"
#include "layers.h"
#include "names.h"

namespace layer {

Result<std::vector<ImageInfo>> list_images(Pool& pool) {
  LAYER_ASSIGN(auto txn, pool.index().begin_read());
  std::map<std::string, uint32_t> users;
  LAYER_TRY(
      txn.scan(Db::kContainers, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
        LAYER_ASSIGN(auto c, decode_container(v, k));
        ++users[c.image_ref];
        return true;
      }));
  std::vector<ImageInfo> out;
  LAYER_TRY(txn.scan(Db::kImages, "", [&](std::string_view k, std::string_view v) -> Result<bool> {
    LAYER_ASSIGN(auto image, decode_image(v, k));
    LAYER_ASSIGN(auto layer, get_layer(txn, image.top_layer));
    uint64_t data = 0, zero = 0;
    LAYER_TRY(count_blocks(txn, layer.id, &data, &zero));
    out.push_back(ImageInfo{image, layer, data, users[image.ref]});
    return true;
  }));
  return out;
}

Status remove_image(Pool& pool, const std::string& ref) {
  LAYER_TRY(pool.check_writable());
  LAYER_TRY(validate_image_ref(ref));
  std::vector<uint64_t> drops;
  LAYER_TRY(pool.committer().run([&](WriteTxn& txn) -> Status {
    drops.clear();
    LAYER_ASSIGN(auto v, txn.get(Db::kImages, ref));
    if (!v) return make_error(ENOENT, "image {} not found in pool {}", ref, pool.paths().root);
    LAYER_ASSIGN(auto image, decode_image(*v, ref));
    std::vector<std::string> users;
    LAYER_TRY(
        txn.scan(Db::kContainers, "", [&](std::string_view k, std::string_view cv) -> Result<bool> {
          LAYER_ASSIGN(auto c, decode_container(cv, k));
          if (c.image_ref == ref) users.push_back(c.name);
          return true;
        }));
    if (!users.empty())
      return make_error(EBUSY, "image {} is in use by {} container(s): {}", ref, users.size(),
                        fmt::join(users, ", "));
    LAYER_TRY(txn.del(Db::kImages, ref));
    LAYER_TRY(drop_boot_profile(txn, ref));
    return drop_layer(txn, image.top_layer, &drops);
  }));
  // Files are unlinked only after the transaction that dropped the last reference committed.
  return finish_drops_after_removal(pool, drops, fmt::format("image {}", ref));
}

}  // namespace layer
