# busybox: a small closure (busybox + a script), the program prints one line.
#   hello -> busybox, hello-docs (never read)
{ variant ? "", busyboxSrc ? "/bin/busybox" }:
let
  inherit (import ./common.nix) mk;
  suffix = if variant == "" then "" else "-" + variant;
  busybox = mk "bench-busybox" ''
    mkdir -p $out/bin
    cp ${busyboxSrc} $out/bin/busybox
    for a in sh cat echo ls head wc sleep true; do ln -s busybox $out/bin/$a; done
  '';
  docs = mk "bench-hello-docs" ''
    mkdir -p $out/share/doc
    cp /usr/share/common-licenses/GPL-3 $out/share/doc/COPYING
  '';
  hello = mk "bench-hello${suffix}" ''
    mkdir -p $out/bin
    cat > $out/bin/hello <<EOS
    #!${busybox}/bin/sh
    # manual: ${docs}/share/doc
    echo "hello from busybox${suffix}"
    EOS
    chmod +x $out/bin/hello
  '';
in hello
