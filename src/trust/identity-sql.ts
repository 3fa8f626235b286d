/**
 * SQL for the proxy identity inside PostgreSQL: the gateway's identity key, HMAC-SHA256 built on
 * the built-in sha256() (no pgcrypto), and the functions row-level-security policies call to learn
 * for whom a statement runs. Installed by trustCatalogSql (catalog-sql.ts), idempotent.
 *
 * The gateway sets `trustgate.identity` (compact JSON) and `trustgate.identity_mac` (lower-case hex
 * HMAC-SHA256 of that exact text under the key) on its server connection; trustgate.identity()
 * accepts the JSON only when the MAC matches and the token names this backend and session user.
 */

/** A PostgreSQL identifier, always double-quoted. */
/** NOTIFY channel: payload is the trusted user whose rules changed, or '*' (identity key rotated). */
export const RULES_CHANNEL = 'trustgate_rules';

export function sqlIdent(name: string): string {
  return `"${name.replace(/"/g, '""')}"`;
}

/** Pinned search path of every trustgate function (pg_temp last, so nothing can shadow builtins). */
const PINNED = 'SET search_path = pg_catalog, pg_temp';

/** Raised by identity() when the settings are not a valid token for this session. */
export const IDENTITY_FORGED_MESSAGE = 'trustgate identity settings were not set by trustgate';

export function identitySql(authRole: string): string {
  const auth = sqlIdent(authRole);
  return `
-- HMAC-SHA256 (RFC 2104) from sha256(): K0 = key (sha256(key) when longer than 64 bytes) padded
-- with zeros to 64 bytes; HMAC = sha256((K0 xor opad) || sha256((K0 xor ipad) || msg)).
CREATE OR REPLACE FUNCTION trustgate.hmac_pad(key bytea, pad integer) RETURNS bytea
  LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE ${PINNED}
AS $fn$
DECLARE
  k0 bytea := CASE WHEN length(key) > 64 THEN sha256(key) ELSE key END;
  padded bytea;
BEGIN
  k0 := k0 || decode(repeat('00', 64 - length(k0)), 'hex');
  padded := k0;
  FOR i IN 0..63 LOOP
    padded := set_byte(padded, i, get_byte(k0, i) # pad);
  END LOOP;
  RETURN padded;
END
$fn$;

CREATE OR REPLACE FUNCTION trustgate.hmac_sha256(key bytea, msg bytea) RETURNS bytea
  LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE ${PINNED}
AS $fn$ SELECT sha256(trustgate.hmac_pad($1, 92) || sha256(trustgate.hmac_pad($1, 54) || $2)) $fn$;

-- 256 bits from pg_strong_random (gen_random_uuid gives 122 random bits per call).
CREATE OR REPLACE FUNCTION trustgate.random_key() RETURNS bytea
  LANGUAGE sql VOLATILE ${PINNED}
AS $fn$
  SELECT sha256(uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid())
             || uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid()))
$fn$;

REVOKE ALL ON FUNCTION trustgate.hmac_pad(bytea, integer), trustgate.hmac_sha256(bytea, bytea),
  trustgate.random_key() FROM PUBLIC;

-- One key; the padded keys are stored so that each identity() check costs two sha256() calls.
CREATE TABLE IF NOT EXISTS trustgate.identity_key (
  id integer PRIMARY KEY DEFAULT 1 CHECK (id = 1),
  key bytea NOT NULL CHECK (length(key) = 32),
  ipad_key bytea GENERATED ALWAYS AS (trustgate.hmac_pad(key, 54)) STORED,
  opad_key bytea GENERATED ALWAYS AS (trustgate.hmac_pad(key, 92)) STORED,
  created_at timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON trustgate.identity_key FROM PUBLIC;
INSERT INTO trustgate.identity_key (id, key)
  SELECT 1, trustgate.random_key() WHERE NOT EXISTS (SELECT FROM trustgate.identity_key);

CREATE OR REPLACE FUNCTION trustgate.identity_key_for_gateway() RETURNS bytea
  LANGUAGE sql STABLE SECURITY DEFINER ${PINNED}
AS $fn$ SELECT key FROM trustgate.identity_key WHERE id = 1 $fn$;
REVOKE ALL ON FUNCTION trustgate.identity_key_for_gateway() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION trustgate.identity_key_for_gateway() TO ${auth};

CREATE OR REPLACE FUNCTION trustgate.rotate_identity_key() RETURNS void
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER ${PINNED}
AS $fn$
BEGIN
  INSERT INTO trustgate.identity_key AS k (id, key) VALUES (1, trustgate.random_key())
    ON CONFLICT (id) DO UPDATE SET key = EXCLUDED.key, created_at = now();
  PERFORM pg_notify('${RULES_CHANNEL}', '*');
END
$fn$;
REVOKE ALL ON FUNCTION trustgate.rotate_identity_key() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION trustgate.rotate_identity_key() TO trustgate_admin;

-- Marks trusted requests of the middle tier: hex HMAC(key, 'trusted-request:' || trusted_user).
CREATE OR REPLACE FUNCTION trustgate.trust_key(trusted_user text) RETURNS text
  LANGUAGE sql STABLE STRICT SECURITY DEFINER ${PINNED}
AS $fn$
  SELECT encode(sha256(k.opad_key || sha256(k.ipad_key || convert_to('trusted-request:' || $1, 'UTF8'))), 'hex')
  FROM trustgate.identity_key k WHERE k.id = 1
$fn$;
REVOKE ALL ON FUNCTION trustgate.trust_key(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION trustgate.trust_key(text) TO trustgate_admin;

-- PARALLEL RESTRICTED: a parallel worker has another pg_backend_pid(), so the check runs in the leader.
CREATE OR REPLACE FUNCTION trustgate.identity() RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER PARALLEL RESTRICTED ${PINNED}
AS $fn$
DECLARE
  txt text := current_setting('trustgate.identity', true);
  mac text := current_setting('trustgate.identity_mac', true);
  k record;
  j jsonb;
  -- The role the session runs as (the "role" setting survives SECURITY DEFINER).
  current_role_name text := coalesce(nullif(current_setting('role', true), 'none'), session_user::text);
BEGIN
  IF txt IS NULL OR txt = '' THEN
    -- A trusted user switched to another role without trustgate's identity: someone erased it.
    IF current_role_name <> session_user::text
       AND EXISTS (SELECT 1 FROM trustgate.connect_rule r WHERE r.trusted_user = session_user::text AND r.revoked_at IS NULL) THEN
      RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = '${IDENTITY_FORGED_MESSAGE}',
        DETAIL = 'The session runs as another role than trustgate set, with no identity.';
    END IF;
    RETURN NULL;
  END IF;
  SELECT ipad_key, opad_key INTO k FROM trustgate.identity_key WHERE id = 1;
  IF k.ipad_key IS NULL OR mac IS NULL
     OR mac <> encode(sha256(k.opad_key || sha256(k.ipad_key || convert_to(txt, 'UTF8'))), 'hex') THEN
    RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = '${IDENTITY_FORGED_MESSAGE}',
      DETAIL = 'trustgate.identity_mac does not match trustgate.identity.';
  END IF;
  j := txt::jsonb;
  IF jsonb_typeof(j) IS DISTINCT FROM 'object'
     OR j->>'pid' IS DISTINCT FROM pg_backend_pid()::text
     OR j->>'tu' IS DISTINCT FROM session_user::text THEN
    RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = '${IDENTITY_FORGED_MESSAGE}',
      DETAIL = 'The identity was issued for another backend or session user.';
  END IF;
  IF j->>'role' IS DISTINCT FROM current_role_name THEN
    RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = '${IDENTITY_FORGED_MESSAGE}',
      DETAIL = 'The session runs as another role than the identity was issued for.';
  END IF;
  RETURN j;
END
$fn$;

CREATE OR REPLACE FUNCTION trustgate.trusted_user() RETURNS text
  LANGUAGE sql STABLE PARALLEL RESTRICTED ${PINNED}
AS $fn$ SELECT CASE WHEN i->>'pu' IS NOT NULL THEN i->>'tu' END FROM trustgate.identity() AS i $fn$;

CREATE OR REPLACE FUNCTION trustgate.proxy_user() RETURNS text
  LANGUAGE sql STABLE PARALLEL RESTRICTED ${PINNED}
AS $fn$ SELECT trustgate.identity()->>'pu' $fn$;

CREATE OR REPLACE FUNCTION trustgate.proxy_role() RETURNS text
  LANGUAGE sql STABLE PARALLEL RESTRICTED ${PINNED}
AS $fn$ SELECT trustgate.identity()->>'pr' $fn$;

CREATE OR REPLACE FUNCTION trustgate.proxy_kind() RETURNS text
  LANGUAGE sql STABLE PARALLEL RESTRICTED ${PINNED}
AS $fn$ SELECT trustgate.identity()->>'k' $fn$;

CREATE OR REPLACE FUNCTION trustgate.query_band() RETURNS text
  LANGUAGE sql STABLE PARALLEL RESTRICTED ${PINNED}
AS $fn$ SELECT trustgate.identity()->>'qb' $fn$;

CREATE OR REPLACE FUNCTION trustgate.query_band(scope text) RETURNS text
  LANGUAGE plpgsql STABLE PARALLEL RESTRICTED ${PINNED}
AS $fn$
BEGIN
  CASE lower(scope)
    WHEN 'transaction' THEN RETURN trustgate.identity()->>'tb';
    WHEN 'session' THEN RETURN trustgate.identity()->>'sb';
    ELSE RAISE EXCEPTION USING ERRCODE = '22023',
      MESSAGE = format('invalid query band scope %L', scope), HINT = 'Use ''transaction'' or ''session''.';
  END CASE;
END
$fn$;

-- Value of a name in a band text 'n=v;n=v;' (names match case-insensitively, pads stripped).
CREATE OR REPLACE FUNCTION trustgate.query_band_value(band text, name text) RETURNS text
  LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE ${PINNED}
AS $fn$
  SELECT btrim(substr(p.pair, strpos(p.pair, '=') + 1), E' \\t\\r\\n')
  FROM regexp_split_to_table($1, ';') WITH ORDINALITY AS p(pair, n)
  WHERE strpos(p.pair, '=') > 0
    AND lower(btrim(substr(p.pair, 1, strpos(p.pair, '=') - 1), E' \\t\\r\\n')) = lower(btrim($2, E' \\t\\r\\n'))
  ORDER BY p.n
  LIMIT 1
$fn$;

CREATE OR REPLACE FUNCTION trustgate.query_band_value(name text) RETURNS text
  LANGUAGE sql STABLE PARALLEL RESTRICTED ${PINNED}
AS $fn$ SELECT trustgate.query_band_value(trustgate.identity()->>'qb', $1) $fn$;

CREATE OR REPLACE FUNCTION trustgate.assert_proxy_role(proxy_user text, role text) RETURNS text
  LANGUAGE plpgsql STABLE ${PINNED}
AS $fn$
BEGIN
  IF pg_has_role($1, $2, 'SET') THEN
    RETURN $2;
  END IF;
  RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = format('proxy user "%s" is not a member of role "%s"', $1, $2);
END
$fn$;

GRANT EXECUTE ON FUNCTION trustgate.identity(), trustgate.trusted_user(), trustgate.proxy_user(),
  trustgate.proxy_role(), trustgate.proxy_kind(), trustgate.query_band(), trustgate.query_band(text),
  trustgate.query_band_value(text), trustgate.query_band_value(text, text),
  trustgate.assert_proxy_role(text, text) TO PUBLIC;
`;
}
