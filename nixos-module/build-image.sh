# The builder of build-image.nix: writes the OCI image layout tar to $out.
# Inputs (environment): closureInfo, configJSON, copyToRoot, imageName, tag,
# architecture. Deterministic: mtime 1, owner 0, sorted entries, gzip -n.
set -eu
umask 022
mkdir -p root/nix/store layout/blobs/sha256

# Placeholders: an empty directory per directory path, else an empty file.
while read -r p; do
  base=${p##*/}
  if [ -d "$p" ] && [ ! -L "$p" ]; then mkdir "root/nix/store/$base"; else : > "root/nix/store/$base"; fi
  chmod 555 "root/nix/store/$base"
done < "$closureInfo/store-paths"

# copyToRoot: directories made, everything else linked to its store path.
for r in $copyToRoot; do
  (cd "$r" && find . -mindepth 1 | sort) | while read -r rel; do
    rel=${rel#./}
    if [ -d "$r/$rel" ] && [ ! -L "$r/$rel" ]; then
      mkdir -p "root/$rel"
    else
      mkdir -p "root/$(dirname "$rel")"
      ln -sfn "$r/$rel" "root/$rel"
    fi
  done
done

det_tar() {
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@1 --format=gnu "$@"
}
sha() { sha256sum "$1" | cut -d' ' -f1; }
size() { wc -c < "$1" | tr -d ' '; }
blob() { d=$(sha "$1"); cp "$1" "layout/blobs/sha256/$d"; echo "$d"; }

det_tar -C root -cf layer.tar .
diff_id=$(sha layer.tar)
gzip -n -9 < layer.tar > layer.tar.gz
layer=$(blob layer.tar.gz); layer_size=$(size layer.tar.gz)

printf '{"architecture":"%s","config":%s,"os":"linux","rootfs":{"diff_ids":["sha256:%s"],"type":"layers"}}' \
  "$architecture" "$configJSON" "$diff_id" > config.json
config=$(blob config.json); config_size=$(size config.json)

printf '{"config":{"digest":"sha256:%s","mediaType":"application/vnd.oci.image.config.v1+json","size":%s},"layers":[{"annotations":{"containerd.io/snapshot/nix-closure":"%s","containerd.io/snapshot/nix-layer":"true"},"digest":"sha256:%s","mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","size":%s}],"mediaType":"application/vnd.oci.image.manifest.v1+json","schemaVersion":2}' \
  "$config" "$config_size" "$closureInfo" "$layer" "$layer_size" > manifest.json
manifest=$(blob manifest.json); manifest_size=$(size manifest.json)

printf '{"imageLayoutVersion":"1.0.0"}' > layout/oci-layout
printf '{"manifests":[{"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"},"digest":"sha256:%s","mediaType":"application/vnd.oci.image.manifest.v1+json","size":%s}],"schemaVersion":2}' \
  "$imageName" "$tag" "$manifest" "$manifest_size" > layout/index.json

det_tar -C layout -cf "$out" oci-layout index.json blobs
