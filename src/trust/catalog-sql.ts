/**
 * The trusted-sessions catalog inside PostgreSQL: CONNECT THROUGH rules, the procedure that applies
 * a parsed GRANT/REVOKE CONNECT THROUGH (ConnectThroughStatement as JSON, see connect-through.ts),
 * and the role memberships that bound what a trusted user's pooled connection can become.
 * A superuser runs trustCatalogSql() in the database (idempotent: safe to run again on upgrade).
 * See docs/trusted-sessions-catalog.md.
 */
import { identitySql, RULES_CHANNEL, sqlIdent } from './identity-sql.js';

export { RULES_CHANNEL };

/** Role of the security administrators who may grant and revoke CONNECT THROUGH (Teradata's CTCONTROL). */
export const TRUSTGATE_ADMIN_ROLE = 'trustgate_admin';

const PINNED = 'SET search_path = pg_catalog, pg_temp';

/** Raises `msg` (a format() call) with SQLSTATE `code`, optional hint (a format() call or literal). */
const raise = (code: string, msg: string, hint?: string): string =>
  `RAISE EXCEPTION USING ERRCODE = '${code}', MESSAGE = ${msg}${hint ? `, HINT = ${hint}` : ''};`;

export function trustCatalogSql(authRole: string): string {
  const auth = sqlIdent(authRole);
  return `
CREATE SCHEMA IF NOT EXISTS trustgate;
DO $do$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = '${TRUSTGATE_ADMIN_ROLE}') THEN
    CREATE ROLE ${TRUSTGATE_ADMIN_ROLE} NOLOGIN;
  END IF;
END
$do$;
-- PUBLIC needs USAGE to call the identity functions (e.g. from row-level-security policies);
-- every table and private function below has its own, narrower grants.
GRANT USAGE ON SCHEMA trustgate TO ${TRUSTGATE_ADMIN_ROLE}, ${auth}, PUBLIC;
${identitySql(authRole)}
-- Sorted (C collation), distinct role names: the canonical form stored in connect_rule.roles.
CREATE OR REPLACE FUNCTION trustgate.sorted_roles(roles text[]) RETURNS text[]
  LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE ${PINNED}
AS $fn$ SELECT coalesce(array_agg(DISTINCT r ORDER BY r), '{}') FROM unnest($1::text[] COLLATE "C") AS r $fn$;

-- 'tg_union_' || 16 hex digits of sha256 of the sorted role names joined with ','; NULL below 2 roles.
CREATE OR REPLACE FUNCTION trustgate.union_role_name(roles text[]) RETURNS text
  LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE ${PINNED}
AS $fn$
  SELECT CASE WHEN cardinality(s) >= 2
    THEN 'tg_union_' || left(encode(sha256(convert_to(array_to_string(s, ','), 'UTF8')), 'hex'), 16) END
  FROM trustgate.sorted_roles($1) AS s
$fn$;

CREATE TABLE IF NOT EXISTS trustgate.connect_rule (
  rule_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  trusted_user text NOT NULL,
  proxy_user text,
  kind text NOT NULL CHECK (kind IN ('permanent', 'application', 'trust_only')),
  without_role boolean NOT NULL DEFAULT false,
  roles text[] NOT NULL DEFAULT '{}',
  union_role text,
  granted_by text NOT NULL DEFAULT current_user,
  granted_at timestamptz NOT NULL DEFAULT now(),
  revoked_by text,
  revoked_at timestamptz,
  revoke_reason text CHECK (revoke_reason IN ('revoked', 'superseded')),
  CONSTRAINT connect_rule_shape CHECK (CASE kind
    WHEN 'trust_only' THEN proxy_user IS NULL AND NOT without_role AND cardinality(roles) = 0
    WHEN 'application' THEN proxy_user IS NOT NULL AND NOT without_role AND cardinality(roles) > 0
    ELSE proxy_user IS NOT NULL AND without_role = (cardinality(roles) = 0) END),
  CONSTRAINT connect_rule_roles CHECK (roles = trustgate.sorted_roles(roles)),
  CONSTRAINT connect_rule_union_role CHECK (union_role IS NOT DISTINCT FROM trustgate.union_role_name(roles)),
  CONSTRAINT connect_rule_revocation CHECK (
    (revoked_at IS NULL) = (revoked_by IS NULL) AND (revoked_at IS NULL) = (revoke_reason IS NULL))
);
CREATE UNIQUE INDEX IF NOT EXISTS connect_rule_active
  ON trustgate.connect_rule (trusted_user, coalesce(proxy_user, '')) WHERE revoked_at IS NULL;
REVOKE ALL ON trustgate.connect_rule FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE ON trustgate.connect_rule TO ${TRUSTGATE_ADMIN_ROLE};
GRANT SELECT ON trustgate.connect_rule TO ${auth};

-- Audit: who granted and who revoked is the user doing it; a rule is never changed, only revoked once.
CREATE OR REPLACE FUNCTION trustgate.connect_rule_guard() RETURNS trigger
  LANGUAGE plpgsql ${PINNED}
AS $fn$
BEGIN
  IF TG_OP = 'INSERT' THEN
    IF NEW.revoked_at IS NOT NULL OR NEW.revoked_by IS NOT NULL OR NEW.revoke_reason IS NOT NULL THEN
      ${raise('42501', `'a new CONNECT THROUGH rule cannot be revoked already'`)}
    END IF;
    NEW.granted_by := current_user;
    NEW.granted_at := now();
    RETURN NEW;
  END IF;
  IF OLD.revoked_at IS NOT NULL OR NEW.revoked_at IS NULL
     OR (NEW.rule_id, NEW.trusted_user, NEW.proxy_user, NEW.kind, NEW.without_role, NEW.roles, NEW.union_role,
         NEW.granted_by, NEW.granted_at)
        IS DISTINCT FROM (OLD.rule_id, OLD.trusted_user, OLD.proxy_user, OLD.kind, OLD.without_role, OLD.roles,
         OLD.union_role, OLD.granted_by, OLD.granted_at) THEN
    ${raise('42501', `'CONNECT THROUGH rules are kept for audit: an active rule can only be revoked'`, `'Use trustgate.apply_connect_through.'`)}
  END IF;
  NEW.revoked_by := current_user;
  NEW.revoked_at := now();
  NEW.revoke_reason := coalesce(NEW.revoke_reason, 'revoked');
  RETURN NEW;
END
$fn$;
CREATE OR REPLACE FUNCTION trustgate.connect_rule_notify() RETURNS trigger
  LANGUAGE plpgsql ${PINNED}
AS $fn$
BEGIN
  PERFORM pg_notify('${RULES_CHANNEL}', NEW.trusted_user);
  RETURN NULL;
END
$fn$;
REVOKE ALL ON FUNCTION trustgate.connect_rule_guard(), trustgate.connect_rule_notify() FROM PUBLIC;
CREATE OR REPLACE TRIGGER connect_rule_guard BEFORE INSERT OR UPDATE ON trustgate.connect_rule
  FOR EACH ROW EXECUTE FUNCTION trustgate.connect_rule_guard();
CREATE OR REPLACE TRIGGER connect_rule_notify AFTER INSERT OR UPDATE ON trustgate.connect_rule
  FOR EACH ROW EXECUTE FUNCTION trustgate.connect_rule_notify();

CREATE OR REPLACE VIEW trustgate.connect_rules AS
  SELECT rule_id, trusted_user, proxy_user, kind, without_role, roles, union_role,
    CASE WHEN revoked_at IS NULL THEN 'granted' ELSE 'revoked' END AS status,
    granted_by, granted_at, revoked_by, revoked_at, revoke_reason
  FROM trustgate.connect_rule;
REVOKE ALL ON trustgate.connect_rules FROM PUBLIC;
GRANT SELECT ON trustgate.connect_rules TO ${TRUSTGATE_ADMIN_ROLE}, ${auth};

-- Private bookkeeping of sync_memberships (no grants).
CREATE TABLE IF NOT EXISTS trustgate.managed_membership (
  trusted_user text NOT NULL,
  role text NOT NULL,
  PRIMARY KEY (trusted_user, role)
);
CREATE TABLE IF NOT EXISTS trustgate.union_role (
  role_name text PRIMARY KEY,
  roles text[] NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON trustgate.managed_membership, trustgate.union_role FROM PUBLIC;
${syncMembershipsSql()}
${applyConnectThroughSql()}
`;
}

/** sync_memberships(t): makes t's role memberships match its active rules (SECURITY DEFINER). */
function syncMembershipsSql(): string {
  return `
CREATE OR REPLACE FUNCTION trustgate.sync_memberships(t text) RETURNS void
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER ${PINNED}
AS $fn$
DECLARE
  t_oid oid := (SELECT oid FROM pg_roles WHERE rolname = t);
  u_oid oid;
  needed text[] := '{}';
  rl record;
  u text;
  x text;
  g text;
BEGIN
  PERFORM pg_advisory_xact_lock(hashtext('trustgate.connect_rule'), hashtext(t));
  IF t_oid IS NULL THEN
    DELETE FROM trustgate.managed_membership WHERE trusted_user = t;
    RETURN;
  END IF;
  FOR rl IN SELECT * FROM trustgate.connect_rule
              WHERE trusted_user = t AND revoked_at IS NULL AND kind <> 'trust_only' LOOP
    IF rl.without_role THEN
      needed := needed || rl.proxy_user;
      CONTINUE;
    END IF;
    needed := needed || rl.roles;
    u := trustgate.union_role_name(rl.roles);
    -- A union role only when t may already SET ROLE to every component itself: never more than granted.
    IF u IS NULL OR EXISTS (
         SELECT FROM unnest(rl.roles) AS c(name)
         WHERE NOT EXISTS (SELECT FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid
                           WHERE m.member = t_oid AND r.rolname = c.name AND m.set_option AND NOT r.rolsuper)) THEN
      CONTINUE;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('trustgate.union_role'), hashtext(u)); -- shared by trusted users
    u_oid := (SELECT oid FROM pg_roles WHERE rolname = u);
    IF u_oid IS NULL THEN
      EXECUTE format('CREATE ROLE %I NOLOGIN', u);
      u_oid := (SELECT oid FROM pg_roles WHERE rolname = u);
      INSERT INTO trustgate.union_role (role_name, roles) VALUES (u, rl.roles)
        ON CONFLICT (role_name) DO UPDATE SET roles = EXCLUDED.roles, created_at = now();
    ELSIF NOT EXISTS (SELECT FROM trustgate.union_role WHERE role_name = u) THEN
      ${raise('42710', `format('role "%s" already exists and is not a trustgate union role', u)`)}
    END IF;
    FOREACH x IN ARRAY rl.roles LOOP
      IF NOT EXISTS (SELECT FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid
                     WHERE m.member = u_oid AND r.rolname = x AND m.inherit_option) THEN
        EXECUTE format('GRANT %I TO %I WITH INHERIT TRUE, SET FALSE', x, u);
      END IF;
    END LOOP;
    IF NOT EXISTS (SELECT FROM pg_auth_members WHERE member = t_oid AND roleid = u_oid AND set_option) THEN
      EXECUTE format('GRANT %I TO %I WITH INHERIT FALSE, SET TRUE', u, t);
    END IF;
    needed := needed || u;
  END LOOP;
  -- Memberships the rules need, in the shape trustgate grants them (SET only), are the rules' own.
  INSERT INTO trustgate.managed_membership (trusted_user, role)
    SELECT DISTINCT t, r.rolname::text FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid
    WHERE m.member = t_oid AND m.set_option AND NOT m.inherit_option AND r.rolname::text = ANY (needed)
  ON CONFLICT DO NOTHING;
  -- Memberships no active rule needs any more go, whoever granted them.
  FOR x IN SELECT mm.role FROM trustgate.managed_membership mm
           WHERE mm.trusted_user = t AND NOT (mm.role = ANY (needed)) LOOP
    FOR g IN SELECT gr.rolname FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid
             JOIN pg_roles gr ON gr.oid = m.grantor WHERE m.member = t_oid AND r.rolname = x LOOP
      EXECUTE format('REVOKE %I FROM %I GRANTED BY %I', x, t, g);
    END LOOP;
    DELETE FROM trustgate.managed_membership WHERE trusted_user = t AND role = x;
  END LOOP;
END
$fn$;
REVOKE ALL ON FUNCTION trustgate.sync_memberships(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION trustgate.sync_memberships(text) TO ${TRUSTGATE_ADMIN_ROLE};
`;
}

/**
 * apply_connect_through(stmt): GRANT/REVOKE CONNECT THROUGH as the calling user (SECURITY INVOKER),
 * so PostgreSQL checks the caller's ADMIN option on every membership it grants.
 */
function applyConnectThroughSql(): string {
  const notExists = (v: string) => raise('42704', `format('role "%s" does not exist', ${v})`);
  return `
CREATE OR REPLACE PROCEDURE trustgate.apply_connect_through(stmt jsonb)
  LANGUAGE plpgsql SECURITY INVOKER ${PINNED}
AS $fn$
DECLARE
  k text := stmt->>'kind';
  t text := stmt->>'trustedUser';
  users text[];
  roles text[];
  without_role boolean;
  rule_kind text := CASE WHEN k LIKE '%-permanent' THEN 'permanent' ELSE 'application' END;
  super boolean;
  who text;
  r text;
  old trustgate.connect_rule;
  new_roles text[];
BEGIN
  IF NOT has_table_privilege('trustgate.connect_rule', 'INSERT') THEN
    ${raise('42501', `'permission denied to grant or revoke CONNECT THROUGH'`, `'requires membership in role ${TRUSTGATE_ADMIN_ROLE}'`)}
  END IF;
  users := ARRAY(SELECT jsonb_array_elements_text(coalesce(stmt->'users', '[]')));
  roles := ARRAY(SELECT jsonb_array_elements_text(coalesce(stmt->'roles', '[]')));
  without_role := coalesce((stmt->>'withoutRole')::boolean, false);
  IF k IS NULL OR k NOT IN ('grant-permanent', 'grant-application', 'grant-trust-only',
                            'revoke-permanent', 'revoke-application', 'revoke-trust-only')
     OR coalesce(t, '') = '' OR array_position(users, NULL) IS NOT NULL OR '' = ANY (users)
     OR array_position(roles, NULL) IS NOT NULL OR '' = ANY (roles) THEN
    ${raise('22023', `format('malformed CONNECT THROUGH statement: %s', stmt)`)}
  END IF;
  IF t = ANY (users) THEN
    ${raise('22023', `format('trusted user "%s" cannot be a proxy user of itself', t)`)}
  END IF;
  -- Checked for GRANT only: rules of a dropped role, or of one made superuser since, can still be revoked.
  SELECT rolsuper INTO super FROM pg_roles WHERE rolname = t;
  IF k LIKE 'grant-%' AND NOT FOUND THEN
    ${notExists('t')}
  END IF;
  IF k LIKE 'grant-%' AND super THEN
    ${raise('42501', `format('trusted user "%s" is a superuser', t)`, `'A superuser can become any role; use an ordinary role as trusted user.'`)}
  END IF;
  -- One change at a time per trusted user (sync_memberships takes the same lock).
  PERFORM pg_advisory_xact_lock(hashtext('trustgate.connect_rule'), hashtext(t));

  IF k IN ('grant-permanent', 'grant-application') THEN
    IF cardinality(users) = 0 OR (without_role AND (rule_kind = 'application' OR cardinality(roles) > 0))
       OR (NOT without_role AND cardinality(roles) = 0) THEN
      ${raise('22023', `format('malformed CONNECT THROUGH statement: %s', stmt)`, `'WITHOUT ROLE is for PERMANENT users only; otherwise WITH ROLE needs at least one role.'`)}
    END IF;
    FOREACH who IN ARRAY users LOOP
      SELECT rolsuper INTO super FROM pg_roles WHERE rolname = who;
      IF rule_kind = 'permanent' AND NOT FOUND THEN
        ${notExists('who')}
      ELSIF rule_kind = 'permanent' AND super THEN
        ${raise('42501', `format('proxy user "%s" is a superuser', who)`)}
      ELSIF rule_kind = 'application' AND FOUND THEN
        ${raise('42710', `format('application user "%s" is the name of an existing role', who)`, `format('Use TO PERMANENT %s to grant CONNECT THROUGH to the role.', quote_ident(who))`)}
      END IF;
      IF EXISTS (SELECT FROM trustgate.connect_rule WHERE trusted_user = t AND proxy_user = who
                 AND revoked_at IS NULL AND kind <> rule_kind) THEN
        ${raise('42710', `format('"%s" is already %s proxy user of trusted user "%s"', who, CASE rule_kind WHEN 'permanent' THEN 'an application' ELSE 'a PERMANENT' END, t)`, `'A name is either a PERMANENT or an application proxy user of one trusted user.'`)}
      END IF;
    END LOOP;
    FOREACH r IN ARRAY roles LOOP
      SELECT rolsuper INTO super FROM pg_roles WHERE rolname = r;
      IF NOT FOUND THEN
        ${notExists('r')}
      ELSIF super THEN
        ${raise('42501', `format('role "%s" is a superuser', r)`)}
      END IF;
    END LOOP;
    -- As the caller: PostgreSQL refuses unless the caller has the ADMIN option on the granted role.
    FOREACH who IN ARRAY CASE WHEN without_role THEN users ELSE roles END LOOP
      EXECUTE format('GRANT %I TO %I WITH INHERIT FALSE, SET TRUE', who, t);
    END LOOP;
    FOREACH who IN ARRAY users LOOP
      SELECT * INTO old FROM trustgate.connect_rule
        WHERE trusted_user = t AND proxy_user = who AND revoked_at IS NULL FOR UPDATE;
      new_roles := CASE WHEN without_role THEN '{}'
                        ELSE trustgate.sorted_roles(roles || CASE WHEN old.without_role THEN '{}' ELSE old.roles END) END;
      IF old.rule_id IS NOT NULL THEN
        IF old.without_role = without_role AND old.roles = new_roles THEN
          RAISE NOTICE 'CONNECT THROUGH rule for proxy user "%" through trusted user "%" is already granted', who, t;
          CONTINUE;
        END IF;
        UPDATE trustgate.connect_rule SET revoked_at = now(), revoked_by = current_user, revoke_reason = 'superseded'
          WHERE rule_id = old.rule_id;
      END IF;
      INSERT INTO trustgate.connect_rule (trusted_user, proxy_user, kind, without_role, roles, union_role)
        VALUES (t, who, rule_kind, without_role, new_roles, trustgate.union_role_name(new_roles));
    END LOOP;

  ELSIF k IN ('revoke-permanent', 'revoke-application') THEN
    IF cardinality(users) = 0 THEN
      ${raise('22023', `format('malformed CONNECT THROUGH statement: %s', stmt)`)}
    END IF;
    -- Nothing is revoked as the caller (sync_memberships does it), so check the ADMIN option here.
    FOREACH who IN ARRAY roles || CASE WHEN rule_kind = 'permanent' THEN users ELSE '{}' END LOOP
      IF EXISTS (SELECT FROM pg_roles WHERE rolname = who)
         AND NOT pg_has_role(current_user, who::name, 'MEMBER WITH ADMIN OPTION') THEN
        ${raise('42501', `format('permission denied to revoke CONNECT THROUGH %s "%s"', CASE WHEN who = ANY (roles) THEN 'with role' ELSE 'for PERMANENT user' END, who)`, `format('Only roles with the ADMIN option on role "%s" may do this.', who)`)}
      END IF;
    END LOOP;
    FOREACH who IN ARRAY users LOOP
      SELECT * INTO old FROM trustgate.connect_rule
        WHERE trusted_user = t AND proxy_user = who AND kind = rule_kind AND revoked_at IS NULL FOR UPDATE;
      IF old.rule_id IS NULL THEN
        ${raise('42704', `format('no CONNECT THROUGH rule for %sproxy user "%s" through trusted user "%s"', CASE rule_kind WHEN 'permanent' THEN 'PERMANENT ' ELSE '' END, who, t)`)}
      END IF;
      new_roles := '{}';
      IF cardinality(roles) > 0 THEN
        FOREACH r IN ARRAY roles LOOP
          IF NOT r = ANY (old.roles) THEN
            ${raise('42704', `format('role "%s" is not in the CONNECT THROUGH rule for proxy user "%s" through trusted user "%s"', r, who, t)`)}
          END IF;
        END LOOP;
        new_roles := ARRAY(SELECT x FROM unnest(old.roles) AS x WHERE NOT x = ANY (roles) ORDER BY x COLLATE "C");
      END IF;
      UPDATE trustgate.connect_rule SET revoked_at = now(), revoked_by = current_user,
          revoke_reason = CASE WHEN cardinality(new_roles) > 0 THEN 'superseded' ELSE 'revoked' END
        WHERE rule_id = old.rule_id;
      IF cardinality(new_roles) > 0 THEN
        INSERT INTO trustgate.connect_rule (trusted_user, proxy_user, kind, without_role, roles, union_role)
          VALUES (t, who, rule_kind, false, new_roles, trustgate.union_role_name(new_roles));
      END IF;
    END LOOP;

  ELSIF k = 'grant-trust-only' THEN
    IF EXISTS (SELECT FROM trustgate.connect_rule WHERE trusted_user = t AND kind = 'trust_only' AND revoked_at IS NULL) THEN
      RAISE NOTICE 'trusted user "%" is already TRUST ONLY', t;
    ELSE
      INSERT INTO trustgate.connect_rule (trusted_user, proxy_user, kind) VALUES (t, NULL, 'trust_only');
    END IF;

  ELSE -- revoke-trust-only
    UPDATE trustgate.connect_rule SET revoked_at = now(), revoked_by = current_user, revoke_reason = 'revoked'
      WHERE trusted_user = t AND kind = 'trust_only' AND revoked_at IS NULL;
    IF NOT FOUND THEN
      ${raise('42704', `format('no CONNECT THROUGH TRUST ONLY rule for trusted user "%s"', t)`)}
    END IF;
  END IF;
  PERFORM trustgate.sync_memberships(t);
END
$fn$;
`;
}
