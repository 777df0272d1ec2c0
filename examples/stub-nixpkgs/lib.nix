# The few nixpkgs `lib` functions the examples and attache's flake use, with
# nixpkgs' names and behaviour. Pure: no packages.
let
  inherit (builtins) attrNames concatStringsSep filter foldl' genList head
    isAttrs isFunction isList length listToAttrs map replaceStrings stringLength
    substring tail;
  lib = rec {
    inherit attrNames concatStringsSep filter foldl' head isAttrs isFunction
      isList length listToAttrs map tail;
    id = x: x;
    const = x: _: x;
    fix = f: let x = f x; in x;
    extends = f: rattrs: self: let super = rattrs self; in super // f self super;
    composeExtensions = f: g: final: prev:
      let fApplied = f final prev; prev' = prev // fApplied;
      in fApplied // g final prev';
    composeManyExtensions = foldl' (a: b: composeExtensions a b) (final: prev: { });

    attrValues = builtins.attrValues;
    mapAttrs = builtins.mapAttrs;
    mapAttrsToList = f: attrs: map (n: f n attrs.${n}) (attrNames attrs);
    filterAttrs = pred: set: listToAttrs (concatMap (n: let v = set.${n}; in if pred n v then [ (nameValuePair n v) ] else [ ]) (attrNames set));
    nameValuePair = name: value: { inherit name value; };
    genAttrs = names: f: listToAttrs (map (n: nameValuePair n (f n)) names);
    recursiveUpdate = lhs: rhs: lhs // builtins.mapAttrs (n: v:
      if isAttrs v && lhs ? ${n} && isAttrs lhs.${n} && !(v ? outPath) then recursiveUpdate lhs.${n} v else v) rhs;
    optionalAttrs = cond: as: if cond then as else { };
    attrByPath = path: default: set:
      if path == [ ] then set
      else if set ? ${head path} then attrByPath (tail path) default set.${head path}
      else default;

    concatMap = builtins.concatMap;
    concatLists = builtins.concatLists;
    optional = cond: x: if cond then [ x ] else [ ];
    optionals = cond: xs: if cond then xs else [ ];
    unique = foldl' (acc: x: if builtins.elem x acc then acc else acc ++ [ x ]) [ ];
    flatten = x: if isList x then concatMap flatten x else [ x ];

    optionalString = cond: s: if cond then s else "";
    concatStrings = concatStringsSep "";
    concatMapStrings = f: xs: concatStrings (map f xs);
    concatMapStringsSep = sep: f: xs: concatStringsSep sep (map f xs);
    concatLines = xs: concatMapStrings (x: x + "\n") xs;
    hasPrefix = pre: s: substring 0 (stringLength pre) s == pre;
    hasSuffix = suf: s: let ls = stringLength s; lf = stringLength suf;
      in lf <= ls && substring (ls - lf) lf s == suf;
    removePrefix = pre: s: if hasPrefix pre s then substring (stringLength pre) (-1) s else s;
    removeSuffix = suf: s: if hasSuffix suf s then substring 0 (stringLength s - stringLength suf) s else s;
    escapeShellArg = s: "'${replaceStrings [ "'" ] [ "'\\''" ] (toString s)}'";
    escapeShellArgs = xs: concatStringsSep " " (map escapeShellArg xs);
    makeSearchPath = sub: paths: concatStringsSep ":" (map (p: "${p}/${sub}") (filter (p: p != null) paths));
    makeBinPath = makeSearchPath "bin";
    toUpper = replaceStrings lowerChars upperChars;
    toLower = replaceStrings upperChars lowerChars;
    lowerChars = genList (i: substring i 1 "abcdefghijklmnopqrstuvwxyz") 26;
    upperChars = genList (i: substring i 1 "ABCDEFGHIJKLMNOPQRSTUVWXYZ") 26;

    isDerivation = x: isAttrs x && (x.type or null) == "derivation";
    getName = x: x.pname or (builtins.parseDrvName (x.name or x)).name;
    getVersion = x: x.version or (builtins.parseDrvName (x.name or x)).version;
    getExe = x: "${x}/bin/${x.meta.mainProgram or (getName x)}";
    getExe' = x: bin: "${x}/bin/${bin}";
    getBin = x: x;
    getLib = x: x;
    getDev = x: x;

    # Real nixpkgs filters the source; the stub only ever sees tracked files.
    cleanSource = src: src;
    cleanSourceWith = { src, ... }: src;

    licenses = {
      mit = { spdxId = "MIT"; shortName = "mit"; };
      asl20 = { spdxId = "Apache-2.0"; shortName = "asl20"; };
      gpl2Only = { spdxId = "GPL-2.0-only"; shortName = "gpl2Only"; };
    };
    platforms = { linux = [ "x86_64-linux" "aarch64-linux" ]; all = [ "x86_64-linux" "aarch64-linux" ]; };
    maintainers = { };
    systems.flakeExposed = [ "x86_64-linux" "aarch64-linux" ];
    version = "stub";
    trivial.version = "stub";
  };
in
lib
