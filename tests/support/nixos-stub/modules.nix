# A small module system with NixOS' semantics for what nixos-module/ needs:
# modules are functions of { config, lib, pkgs, utils, ... } (or plain sets)
# returning { options, config } or a shorthand config; definitions may use
# mkIf / mkMerge / mkOverride at any depth; option values are computed per
# declared option (so `config = mkIf cfg.enable ...` does not recurse), with
# priorities, type checks, and defaults; defining an undeclared option fails.
lib:
let
  inherit (builtins)
    attrNames concatMap concatStringsSep filter foldl' isAttrs isFunction
    isPath map mapAttrs;
  inherit (lib) discharge highestPriority propertyOf;

  isOption = x: isAttrs x && (x._type or null) == "option";
  showLoc = concatStringsSep ".";

  # Merge option declaration trees; declaring one option twice is an error.
  mergeDecls = loc: a: b:
    if isOption a || isOption b then throw "The option `${showLoc loc}' is declared twice."
    else a // mapAttrs (n: v: if a ? ${n} then mergeDecls (loc ++ [ n ]) a.${n} v else v) b;

  # Push mkIf / mkMerge / mkOverride of an attribute set down to its
  # attributes without deciding any condition: a list of plain sets.
  toAttrsList = v:
    let p = propertyOf v; in
    if p == "merge" then concatMap toAttrsList v.contents
    else if p == "if" then map (mapAttrs (_: lib.mkIf v.condition)) (toAttrsList v.content)
    else if p == "override" then map (mapAttrs (_: lib.mkOverride v.priority)) (toAttrsList v.content)
    else if isAttrs v then [ v ]
    else throw "A module definition is not an attribute set.";

  evalOption = loc: opt: defs:
    let
      given = concatMap discharge defs;
      all' = given ++ (if opt ? default then [ { value = opt.default; priority = 1500; } ] else [ ]);
      chosen = map (d: d.value) (highestPriority all');
      bad = filter (v: !opt.type.check v) chosen;
    in
    if chosen == [ ] then throw "The option `${showLoc loc}' is used but not defined."
    else if bad != [ ] then throw "A definition for option `${showLoc loc}' is not of type `${opt.type.description}'."
    else opt.type.merge loc chosen;

  evalTree = loc: decls: defs:
    mapAttrs (name: decl:
      let sub = concatMap (d: if d ? ${name} then [ d.${name} ] else [ ]) defs; in
      if isOption decl then evalOption (loc ++ [ name ]) decl sub
      else evalTree (loc ++ [ name ]) decl (concatMap toAttrsList sub)) decls;

  # Paths defined in some module but declared nowhere.
  undeclared = loc: decls: defs:
    concatMap (d: concatMap (name:
      if !(decls ? ${name}) then [ (showLoc (loc ++ [ name ])) ]
      else if isOption decls.${name} then [ ]
      else undeclared (loc ++ [ name ]) decls.${name} (toAttrsList d.${name})) (attrNames d)) defs;

  normalize = m:
    if m ? options || m ? config
    then { options = m.options or { }; config = m.config or { }; }
    else { options = { }; config = m; };

  # The option tree for the tests: type, default and description of each option.
  describe = decls:
    mapAttrs (_: decl:
      if isOption decl then {
        type = decl.type.description;
        typeName = decl.type.name;
        hasDefault = decl ? default;
        default = decl.default or null;
        defaultText = if decl ? defaultText then decl.defaultText.text else null;
        description = decl.description or null;
      }
      else describe decl) decls;
in
{
  evalModules = { modules, specialArgs ? { } }:
    let
      args = specialArgs // { inherit lib config; options = decls; };
      loaded = map (m: normalize (
        let m' = if isPath m then import m else m; in
        if isFunction m' then m' args else m')) modules;
      decls = foldl' (mergeDecls [ ]) { } (map (m: m.options) loaded);
      defs = concatMap (m: toAttrsList m.config) loaded;
      config = evalTree [ ] decls defs;
      unknown = undeclared [ ] decls defs;
    in
    {
      config =
        if unknown != [ ] then throw "The option `${builtins.head unknown}' does not exist."
        else config;
      options = describe decls;
    };
}
