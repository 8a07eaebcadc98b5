# A small multi-path closure built from files on this machine (no downloads).
#   prog -> busybox, liba, docs     (prog reads liba, never docs)
#   extra-<tag> (only when tag != "")  to make a second, overlapping closure
# With roots = "1": roots-prog, whose closure holds store paths that are not
# directories (as writeText, writeScript, an empty file and symlinks make them):
#   roots-prog -> greeting.txt, greet-script, empty-file,
#                 greeting-link (-> greeting.txt), liba-link (-> liba), busybox
{ tag ? "", busyboxSrc ? "/bin/busybox", bigSize ? "1", roots ? "" }:
let
  mk = name: script: derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
    PATH = "/usr/bin:/bin";
  };
  busybox = mk "busybox" ''
    mkdir -p $out/bin
    cp ${busyboxSrc} $out/bin/busybox
    for a in sh cat echo ls head wc sleep true; do ln -s busybox $out/bin/$a; done
  '';
  liba = mk "liba" ''
    mkdir -p $out/lib $out/share
    echo "hello from liba" > $out/lib/data
    printf 'x' > $out/share/one-byte
    touch $out/share/empty
    ln -s data $out/lib/data-link
  '';
  docs = mk "docs" ''
    mkdir -p $out/share/doc
    head -c ${bigSize}M /dev/zero | tr '\0' 'd' > $out/share/doc/manual.txt
    echo "never read at start" > $out/share/doc/README
  '';
  extra = mk "extra-${tag}" ''
    mkdir -p $out/share
    echo "extra ${tag}" > $out/share/extra
  '';
  prog = mk "prog${if tag == "" then "" else "-" + tag}" ''
    mkdir -p $out/bin
    cat > $out/bin/prog <<EOS
    #!${busybox}/bin/sh
    # documentation lives in ${docs}/share/doc
    ${if tag == "" then "" else "${busybox}/bin/cat ${extra}/share/extra"}
    exec ${busybox}/bin/cat ${liba}/lib/data
    EOS
    chmod +x $out/bin/prog
  '';
  text = mk "greeting.txt" ''
    echo "hello from a text path" > $out
  '';
  script = mk "greet-script" ''
    printf '#!${busybox}/bin/sh\necho "hello from a script path"\n' > $out
    chmod 0555 $out
  '';
  empty = mk "empty-file" "touch $out";
  textLink = mk "greeting-link" "ln -s ${text} $out";
  libLink = mk "liba-link" "ln -s ${liba} $out";
  rootsProg = mk "roots-prog" ''
    mkdir -p $out/bin
    cat > $out/bin/prog <<EOS
    #!${busybox}/bin/sh
    set -e
    ${busybox}/bin/cat ${text} ${textLink} ${libLink}/lib/data
    ${script}
    ${busybox}/bin/wc -c < ${empty}
    EOS
    chmod +x $out/bin/prog
  '';
in if roots == "" then prog else rootsProg
