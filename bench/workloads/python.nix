# python: Debian's CPython 3.11 and its shared libraries copied into store
# paths and patched with patchelf so that they load only from the store, plus
# paths the program references but does not read at start (documentation,
# extra libraries, site packages, data).
#   python-app -> python3 -> glibc, zlib, expat, app-site, python3-stdlib -> python3-dynload
#                                                  -> sqlite, python3-dynload-libs
#              -> python3-doc, python3-site-packages, extra-libs, app-data
# Program: <python3>/bin/python3 -c 'import json, sqlite3; print("ready")'
# At start site.py runs app-site's sitecustomize, which reads the app's 4 MB
# model; a variant (the delta image) changes app-site, hence python3 and the top.
{ variant ? "", python ? "/usr/bin/python3.11", stdlib ? "/usr/lib/python3.11"
, libdir ? "/lib/x86_64-linux-gnu", dataMB ? "40" }:
let
  inherit (import ./common.nix) mk randomFile;
  suffix = if variant == "" then "" else "-" + variant;
  # Copy shared libraries by soname from the host, rpath pointing at glibc.
  libs = name: sonames: mk name ''
    mkdir -p $out/lib
    for l in ${sonames}; do cp -L ${libdir}/$l $out/lib/$l; done
    chmod u+w $out/lib/*
    ${if name == "glibc" then "" else ''
      for f in $out/lib/*; do patchelf --set-rpath ${glibc}/lib:$out/lib "$f"; done
    ''}
  '';
  glibc = mk "glibc" ''
    mkdir -p $out/lib
    for l in ld-linux-x86-64.so.2 libc.so.6 libm.so.6 libpthread.so.0 libdl.so.2 \
             librt.so.1 libutil.so.1 libresolv.so.2 libcrypt.so.1 libnsl.so.2; do
      if [ -e ${libdir}/$l ]; then cp -L ${libdir}/$l $out/lib/$l; fi
    done
    chmod u+w $out/lib/*
    # libc finds ld.so by soname; give every library the store's glibc first.
    for f in $out/lib/lib*; do patchelf --set-rpath $out/lib "$f"; done
  '';
  zlib = libs "zlib" "libz.so.1";
  expat = libs "expat" "libexpat.so.1";
  sqlite = libs "sqlite" "libsqlite3.so.0";
  dynloadLibs = libs "python3-dynload-libs" (
    "libbz2.so.1.0 libcom_err.so.2 libcrypto.so.3 libdb-5.3.so libffi.so.8 "
    + "libgssapi_krb5.so.2 libk5crypto.so.3 libkeyutils.so.1 libkrb5.so.3 "
    + "libkrb5support.so.0 liblzma.so.5 libncursesw.so.6 libpanelw.so.6 "
    + "libreadline.so.8 libssl.so.3 libtinfo.so.6 libtirpc.so.3 libuuid.so.1");
  rpath = "${glibc}/lib:${zlib}/lib:${expat}/lib:${sqlite}/lib:${dynloadLibs}/lib";
  dynload = mk "python3-dynload" ''
    mkdir -p $out
    cp -r ${stdlib}/lib-dynload $out/lib-dynload
    chmod -R u+w $out
    for f in $out/lib-dynload/*.so; do patchelf --set-rpath ${rpath} "$f"; done
  '';
  stdlibPath = mk "python3-stdlib" ''
    mkdir -p $out/lib/python3.11
    cd ${stdlib}
    for e in *; do
      case "$e" in
        lib-dynload|__pycache__|test|sitecustomize.py) ;;  # Debian links it to /etc
        *) cp -r "$e" $out/lib/python3.11/ ;;
      esac
    done
    ln -s ${dynload}/lib-dynload $out/lib/python3.11/lib-dynload
  '';
  appSite = mk "app-site${suffix}" ''
    mkdir -p $out/lib/python3/dist-packages
    cd $out/lib/python3/dist-packages
    ${randomFile "model.bin" 4 "app-site${suffix}"}
    cat > sitecustomize.py <<EOS
    import os.path
    with open(os.path.join(os.path.dirname(__file__), "model.bin"), "rb") as f:
        MODEL = f.read()
    EOS
  '';
  python3 = mk "python3-3.11" ''
    mkdir -p $out/bin $out/lib
    cp ${python} $out/bin/python3.11
    chmod u+w $out/bin/python3.11
    patchelf --set-interpreter ${glibc}/lib/ld-linux-x86-64.so.2 \
             --set-rpath ${glibc}/lib:${zlib}/lib:${expat}/lib $out/bin/python3.11
    ln -s python3.11 $out/bin/python3
    # CPython finds its prefix from the landmark lib/python3.11/os.py next to bin/.
    ln -s ${stdlibPath}/lib/python3.11 $out/lib/python3.11
    # Debian's site.py adds <prefix>/lib/python3/dist-packages when it exists.
    mkdir -p $out/lib/python3
    ln -s ${appSite}/lib/python3/dist-packages $out/lib/python3/dist-packages
  '';
  doc = mk "python3-doc" ''
    mkdir -p $out/share
    cp -r /usr/share/doc $out/share/doc
  '';
  sitePackages = mk "python3-site-packages" ''
    mkdir -p $out/lib/python3
    cp -r /usr/lib/python3/dist-packages $out/lib/python3/dist-packages
  '';
  extraLibs = libs "extra-libs" "libicudata.so.72 libz3.so.4";
  data = mk "app-data" ''
    mkdir -p $out/share
    ${randomFile "$out/share/model.bin" (builtins.fromJSON dataMB) "app-data"}
  '';
in mk "python-app${suffix}" ''
  mkdir -p $out/bin $out/nix-support
  cat > $out/nix-support/runtime-paths <<EOS
  ${python3}
  ${doc}
  ${sitePackages}
  ${extraLibs}
  ${data}
  EOS
  ln -s ${python3}/bin/python3 $out/bin/python3
''
