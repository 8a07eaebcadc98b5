# A small stand-in for the part of nixpkgs' `lib` that nixos-module/ uses,
# written for the tests (no nixpkgs checkout is needed). Every name here
# exists in nixpkgs with the same meaning; the module system itself is in
# ./modules.nix.
let
  inherit (builtins)
    all attrNames concatLists concatMap concatStringsSep elem filter foldl' head
    isAttrs isBool isFunction isList isPath isString length map
    stringLength substring;

  isStringLike = x: isString x || isPath x || (isAttrs x && x ? outPath);

  hasPrefix = prefix: s: substring 0 (stringLength prefix) s == prefix;

  removePrefix = prefix: s:
    if hasPrefix prefix s
    then substring (stringLength prefix) (stringLength s - stringLength prefix) s
    else s;

  isDerivation = x: isAttrs x && (x.type or null) == "derivation";

  # Definitions of one option: all equal, or an error.
  mergeEqualOption = loc: values:
    if all (v: v == head values) values then head values
    else throw "The option `${concatStringsSep "." loc}' has conflicting definition values.";

  mkOptionType = attrs: { _type = "option-type"; merge = mergeEqualOption; } // attrs;

  # Recursive merge used by `types.anything`: attribute sets merge by name
  # (properties such as mkIf may appear at any depth), lists concatenate,
  # anything else must be equal.
  mergeAnything = loc: values:
    if values != [ ] && all (v: isAttrs v && !isDerivation v) values then
      let
        names = foldl' (acc: n: if elem n acc then acc else acc ++ [ n ]) [ ] (concatMap attrNames values);
        merged = map (name: {
          inherit name;
          defs = highestPriority (concatMap (v: if v ? ${name} then discharge v.${name} else [ ]) values);
        }) names;
      in
      builtins.listToAttrs (map (m: { inherit (m) name; value = mergeAnything (loc ++ [ m.name ]) (map (d: d.value) m.defs); })
        (filter (m: m.defs != [ ]) merged))
    else if all isList values then concatLists values
    else mergeEqualOption loc values;

  types = {
    bool = mkOptionType { name = "bool"; description = "boolean"; check = isBool; };
    str = mkOptionType { name = "str"; description = "string"; check = isString; };
    strMatching = pattern: mkOptionType {
      name = "strMatching ${builtins.toJSON pattern}";
      description = "string matching the pattern ${pattern}";
      check = x: isString x && builtins.match pattern x != null;
    };
    path = mkOptionType {
      name = "path";
      description = "path";
      check = x: isStringLike x && substring 0 1 (toString x) == "/";
    };
    package = mkOptionType {
      name = "package";
      description = "package";
      check = x: isDerivation x || (isString x && hasPrefix "/nix/store/" x);
    };
    anything = mkOptionType {
      name = "anything";
      description = "anything";
      check = _: true;
      merge = mergeAnything;
    };
    listOf = elemType: mkOptionType {
      name = "listOf";
      description = "list of ${elemType.description}";
      check = x: isList x && all elemType.check x;
      merge = _loc: concatLists;
    };
    nullOr = elemType: mkOptionType {
      name = "nullOr";
      description = "null or ${elemType.description}";
      check = x: x == null || elemType.check x;
      merge = loc: values:
        if all (v: v == null) values then null
        else if all (v: v != null) values then elemType.merge loc values
        else throw "The option `${concatStringsSep "." loc}' is defined both null and not null.";
    };
  };

  # Properties, as the module system understands them.
  mkIf = condition: content: { _type = "if"; inherit condition content; };
  mkMerge = contents: { _type = "merge"; inherit contents; };
  mkOverride = priority: content: { _type = "override"; inherit priority content; };
  mkDefault = mkOverride 1000;
  mkForce = mkOverride 50;
  mkOptionDefault = mkOverride 1500;

  propertyOf = v: if isAttrs v then v._type or null else null;

  # A definition as a list of { value, priority } with conditions decided.
  discharge = v:
    let p = propertyOf v; in
    if p == "merge" then concatMap discharge v.contents
    else if p == "if" then (if v.condition then discharge v.content else [ ])
    else if p == "override" then map (d: d // { inherit (v) priority; }) (discharge v.content)
    else [ { value = v; priority = 100; } ];

  highestPriority = defs:
    let best = foldl' (m: d: if d.priority < m then d.priority else m) 9999 defs;
    in filter (d: d.priority == best) defs;
in
{
  inherit types mkOptionType mkIf mkMerge mkOverride mkDefault mkForce mkOptionDefault;
  inherit discharge highestPriority propertyOf isDerivation hasPrefix removePrefix;

  mkOption = attrs: { _type = "option"; } // attrs;
  mkEnableOption = name: {
    _type = "option";
    type = types.bool;
    default = false;
    example = true;
    description = "Whether to enable ${name}.";
  };
  literalExpression = text: { _type = "literalExpression"; inherit text; };

  optional = cond: x: if cond then [ x ] else [ ];
  optionals = cond: xs: if cond then xs else [ ];
  optionalAttrs = cond: attrs: if cond then attrs else { };
  inherit concatStringsSep concatMap;
  any = builtins.any;
  mapAttrsToList = f: attrs: map (name: f name attrs.${name}) (attrNames attrs);
  getExe = x: "${x}/bin/${x.meta.mainProgram}";
  makeBinPath = paths: concatStringsSep ":" (map (p: "${p}/bin") paths);

  licenses.mit = { spdxId = "MIT"; };
  platforms.linux = [ "x86_64-linux" "aarch64-linux" ];

  # Source filtering: the stub keeps the paths, the build is not evaluated.
  fileset = {
    unions = paths: paths;
    toSource = { root, fileset }: { inherit root fileset; };
  };

}
