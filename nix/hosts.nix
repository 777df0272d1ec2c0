# The host inventory, normalised. Pure: needs no package set.
#
#   attache.hosts = attache.lib.hosts {
#     web1 = { host = "10.0.0.5"; tags = [ "web" ]; services = [ demo ];
#              checks.demo = [ { type = "http"; url = "http://127.0.0.1:8080/"; } ]; };
#   };
#
# Every field is filled in (user and port with null: ssh's config decides); `services` becomes an attrset name -> derivation
# (a list is keyed by each element's pname, else its name); each check gets
# `timeout` and `retries` (null when not given: the CLI's defaults apply).
#
# Per host, per service: `settings.SERVICE."UNIT" = { Section.Key = value or [ values ]; }`
# becomes a drop-in for that unit; `secrets.SERVICE.NAME = { file = "/abs/path"; }` or
# `{ command = [ "pass" "show" "db" ]; }` is read by the CLI at deploy time and handed to the
# service as the credential NAME.
#
# A pull host fetches its images itself from what `attache publish` writes:
#   pull = { url = "https://images.example/attache"; interval = "15min";
#            publicKey = "ssh-ed25519 AAAA… publisher"; };   # or insecureUnsigned = true;
# `interval` defaults to "15min"; `publicKey` is the public half of `attache publish --key`. A secret is never a value here, and never a Nix path
# (evaluation would copy it into the world-readable store).
let
  serviceKey = s:
    if builtins.isAttrs s then s.pname or s.name or (throw "attache.hosts: a service has neither pname nor name")
    else throw "attache.hosts: a service in a list must be a derivation (got a ${builtins.typeOf s}); use an attrset name = value to name it";

  normServices = services:
    if builtins.isList services
    then builtins.listToAttrs (map (s: { name = serviceKey s; value = s; }) services)
    else services;

  normCheck = c: c // {
    timeout = c.timeout or null;
    retries = c.retries or null;
  };
  normChecks = builtins.mapAttrs (_: cs: map normCheck (if builtins.isList cs then cs else [ cs ]));

  normSecret = where: s:
    if !(builtins.isAttrs s) then throw "attache.hosts: ${where} must be { file = \"/path\"; } or { command = [ ... ]; }"
    else if s ? file then
      if builtins.isPath s.file
      then throw "attache.hosts: ${where}.file is a Nix path, and evaluating it would copy the secret into the world-readable Nix store; write it as a string instead: file = \"/absolute/path\";"
      else if !(builtins.isString s.file) then throw "attache.hosts: ${where}.file must be a string (an absolute path)"
      else { file = s.file; }
    else if s ? command then
      if builtins.isList s.command && builtins.all builtins.isString s.command && s.command != [ ]
      then { command = s.command; }
      else throw "attache.hosts: ${where}.command must be a non-empty list of strings, e.g. [ \"pass\" \"show\" \"db\" ]"
    else throw "attache.hosts: ${where} must be { file = \"/path\"; } or { command = [ ... ]; }";
  normSecrets = host: builtins.mapAttrs (svc: builtins.mapAttrs (n: normSecret "${host}.secrets.${svc}.${n}"));

  normHost = name: h:
    # user and port stay null unless set, so the user's ssh config decides.
    let user = h.user or null; in
    h // {
      host = h.host or name;
      inherit user;
      port = h.port or null;
      tags = h.tags or [ ];
      services = normServices (h.services or { });
      profile = h.profile or "default";
      sudo = h.sudo or (user != null && user != "root");
      checks = normChecks (h.checks or { });
      settings = h.settings or { };
      secrets = normSecrets name (h.secrets or { });
      # Only when asked: hosts that cannot encrypt credentials get them as
      # plain root-only files.
      unencryptedSecrets = h.unencryptedSecrets or false;
      pull =
        if !(h ? pull) || h.pull == null then null
        else if !(builtins.isAttrs h.pull) || !(h.pull ? url)
        then throw "attache.hosts: ${name}.pull must be { url = \"https://…\"; publicKey = \"ssh-ed25519 …\"; }"
        else {
          url = h.pull.url;
          interval = h.pull.interval or "15min";
          publicKey = h.pull.publicKey or null;
          insecureUnsigned = h.pull.insecureUnsigned or false;
        };
    };
in
inventory: builtins.mapAttrs normHost inventory
