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
    };
in
inventory: builtins.mapAttrs normHost inventory
