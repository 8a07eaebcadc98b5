# Helpers shared by the benchmark workloads: derivations built from files on
# this machine (no downloads; needs `sandbox = false`).
{
  # A derivation whose builder is a shell script (host tools on PATH).
  mk = name: script: derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
    PATH = "/usr/bin:/bin";
  };

  # Shell snippet: write MB mebibytes of deterministic incompressible bytes
  # (seeded by SEED) to FILE.
  randomFile = file: mb: seed: ''
    python3 -c 'import random, sys; r = random.Random(sys.argv[1]); f = open(sys.argv[2], "wb"); [f.write(r.randbytes(1 << 20)) for _ in range(int(sys.argv[3]))]' \
      '${seed}' "${file}" ${toString mb}
  '';
}
