# An attribute set for `lazystore registry --expression` tests: small programs
# built from files on this machine (no downloads), all in one binary cache.
let
  mk = name: script: derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
    PATH = "/usr/bin:/bin";
  };
  busybox = mk "attrs-busybox" ''
    mkdir -p $out/bin
    cp /bin/busybox $out/bin/busybox
    for a in sh cat echo ls; do ln -s busybox $out/bin/$a; done
  '';
  program = name: text: mk name ''
    mkdir -p $out/bin
    printf '#!${busybox}/bin/sh\necho ${text}\n' > $out/bin/${name}
    chmod +x $out/bin/${name}
  '';
in {
  inherit busybox;
  hello = program "hello" "hello from the registry";
  greet = program "greet" "greetings";
  Mixed = program "mixed" "mixed case";
  broken = mk "broken" "exit 1";
}
