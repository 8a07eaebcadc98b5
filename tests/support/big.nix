# One store path holding one large incompressible file (for memory tests).
{ mb ? "256", seed ? "lazystore-big" }:
derivation {
  name = "big-${mb}m";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  PATH = "/usr/bin:/bin";
  args = [ "-c" ''
    mkdir -p $out/share
    python3 -c 'import random, sys; r = random.Random(sys.argv[1]); f = open(sys.argv[2], "wb"); [f.write(r.randbytes(1 << 20)) for _ in range(int(sys.argv[3]))]' \
      '${seed}' $out/share/blob ${mb}
  '' ];
}
