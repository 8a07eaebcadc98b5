# wide: a closure of ~320 store paths, small and large, where the program reads
# only a few of them (the case where per-layer limits bite).
#   wide -> busybox, part-000 .. part-299, blob-00 .. blob-19
{ variant ? "", busyboxSrc ? "/bin/busybox", parts ? "300", blobs ? "20" }:
let
  inherit (import ./common.nix) mk randomFile;
  suffix = if variant == "" then "" else "-" + variant;
  pad = n: let s = toString n; in
    if n < 10 then "00" + s else if n < 100 then "0" + s else s;
  busybox = mk "bench-busybox" ''
    mkdir -p $out/bin
    cp ${busyboxSrc} $out/bin/busybox
    for a in sh cat echo ls head wc sleep true; do ln -s busybox $out/bin/$a; done
  '';
  part = i: mk "wide-part-${pad i}" ''
    mkdir -p $out/share
    echo "part ${toString i}" > $out/share/id
    head -c ${toString (1024 * (1 + i - (i / 16) * 16))} /usr/share/common-licenses/GPL-3 > $out/share/text
  '';
  blob = i: mk "wide-blob-${pad i}" ''
    mkdir -p $out/share
    ${randomFile "$out/share/blob" 4 "wide-blob-${toString i}"}
  '';
  partList = builtins.genList part (builtins.fromJSON parts);
  blobList = builtins.genList blob (builtins.fromJSON blobs);
  extra = mk "wide-extra${suffix}" ''
    mkdir -p $out/share
    ${randomFile "$out/share/blob" 2 "wide-extra${suffix}"}
  '';
in mk "wide${suffix}" ''
  mkdir -p $out/bin $out/nix-support
  for p in ${toString partList} ${toString blobList}; do echo "$p" >> $out/nix-support/depends; done
  ${if variant == "" then "" else "echo ${extra} >> $out/nix-support/depends"}
  cat > $out/bin/wide <<EOS
  #!${busybox}/bin/sh
  ${busybox}/bin/cat ${builtins.elemAt partList 0}/share/id ${builtins.elemAt partList 7}/share/id > /dev/null
  ${busybox}/bin/head -c 1 ${builtins.elemAt blobList 3}/share/blob > /dev/null
  echo "wide ready${suffix}"
  EOS
  chmod +x $out/bin/wide
''
