/**
 * The audit schema inside PostgreSQL, installed by `trustgate init` after the trusted-sessions
 * catalog (it uses trustgate.identity() and trustgate_admin): the query log, the access log, the
 * creators of objects (an event trigger), views to read them, the retention function, and the
 * privileges that keep the rows honest. Idempotent: a second run changes nothing and keeps rows.
 * See docs/audit.md.
 */
import { sqlIdent } from '../trust/identity-sql.js';
import { TRUSTGATE_ADMIN_ROLE } from '../trust/catalog-sql.js';
import { ACCESS_LOG_COLUMNS, QUERY_LOG_COLUMNS, type ColumnSpec } from './records.js';

/** Role of those who may read the logs (members of trustgate_admin may as well). */
export const TRUSTGATE_AUDITOR_ROLE = 'trustgate_auditor';
export const CREATOR_EVENT_TRIGGER = 'trustgate_object_creator';

const PINNED = 'SET search_path = pg_catalog, pg_temp';
const READERS = `${TRUSTGATE_AUDITOR_ROLE}, ${TRUSTGATE_ADMIN_ROLE}`;

/** The INSERT of one batch, as the writer runs it ($1 = query-log rows, $2 = access-log rows, JSON arrays). */
export const INSERT_BATCH_SQL = (() => {
  const insert = (table: string, columns: readonly ColumnSpec[], param: string) => {
    const cols = columns.map((c) => c[1]).join(', ');
    // ON CONFLICT without a target: naming (instance, log_id) would need SELECT on them, and the
    // auth role only inserts. The unique (instance, log_id) is the tables' only unique constraint.
    return `INSERT INTO trustgate.${table} (${cols}) SELECT ${cols} FROM json_populate_recordset(NULL::trustgate.${table}, ${param}::json) ON CONFLICT DO NOTHING RETURNING 1`;
  };
  return `WITH q AS (${insert('query_log', QUERY_LOG_COLUMNS, '$1')}), a AS (${insert('access_log', ACCESS_LOG_COLUMNS, '$2')}) SELECT (SELECT count(*) FROM q) AS query_rows, (SELECT count(*) FROM a) AS access_rows`;
})();

/** The array type of a column's values ($n::type[]). */
const arrayType = (sqlType: string): string => (sqlType.startsWith('double precision') ? 'float8' : sqlType.split(' ')[0]);

/**
 * The INSERT of one batch as column arrays: one array literal per column, query-log columns first
 * ($1 … $26), then the access log's ($27 … $44); unnest() turns them back into rows. The same
 * statement shape, ON CONFLICT and counts as INSERT_BATCH_SQL, but PostgreSQL reads arrays of
 * plain values much faster than it populates records from JSON objects (about 10 instead of 17 µs
 * of backend CPU per row). Used for live batches; spooled lines are replayed with INSERT_BATCH_SQL.
 */
export const INSERT_COLUMNS_SQL = (() => {
  let n = 0;
  const insert = (table: string, columns: readonly ColumnSpec[]) => {
    const cols = columns.map((c) => c[1]).join(', ');
    const arrays = columns.map((c) => `$${++n}::${arrayType(c[2])}[]`).join(', ');
    return `INSERT INTO trustgate.${table} (${cols}) SELECT * FROM unnest(${arrays}) ON CONFLICT DO NOTHING RETURNING 1`;
  };
  const q = insert('query_log', QUERY_LOG_COLUMNS);
  const a = insert('access_log', ACCESS_LOG_COLUMNS);
  return `WITH q AS (${q}), a AS (${a}) SELECT (SELECT count(*) FROM q) AS query_rows, (SELECT count(*) FROM a) AS access_rows`;
})();

/** Highest log id of an instance in the database ($1 = instance). */
export const HIGH_WATER_SQL = 'SELECT trustgate.audit_high_water($1)';

function table(name: string, columns: readonly ColumnSpec[]): string {
  const defs = columns.map(([, col, type]) => `  ${col} ${type}`).join(',\n');
  // Later versions add nullable columns only, so an older table is brought up to date in place.
  const upgrades = columns
    .filter(([, , type]) => !/NOT NULL/.test(type))
    .map(([, col, type]) => `ALTER TABLE trustgate.${name} ADD COLUMN IF NOT EXISTS ${col} ${type};`)
    .join('\n');
  return `
CREATE TABLE IF NOT EXISTS trustgate.${name} (
${defs},
  -- Exactly once: a replayed batch (spool, retry after a timeout) inserts nothing twice.
  CONSTRAINT ${name}_instance_log_id UNIQUE (instance, log_id)
);
${upgrades}
REVOKE ALL ON trustgate.${name} FROM PUBLIC;
CREATE OR REPLACE TRIGGER ${name}_immutable BEFORE UPDATE OR DELETE OR TRUNCATE ON trustgate.${name}
  FOR EACH STATEMENT EXECUTE FUNCTION trustgate.audit_immutable();`;
}

export function auditSql(authRole: string): string {
  const auth = sqlIdent(authRole);
  const qcols = QUERY_LOG_COLUMNS.map((c) => `q.${c[1]}`).join(', ');
  const acols = ACCESS_LOG_COLUMNS.map((c) => `a.${c[1]}`).join(', ');
  return `
CREATE SCHEMA IF NOT EXISTS trustgate;
DO $do$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = '${TRUSTGATE_AUDITOR_ROLE}') THEN
    CREATE ROLE ${TRUSTGATE_AUDITOR_ROLE} NOLOGIN;
  END IF;
END
$do$;
GRANT USAGE ON SCHEMA trustgate TO ${READERS};

-- Audit rows are never changed; only purge_audit() deletes (it sets trustgate.audit_purge for
-- its own transaction). A guard against mistakes: superusers can always drop a trigger.
CREATE OR REPLACE FUNCTION trustgate.audit_immutable() RETURNS trigger
  LANGUAGE plpgsql ${PINNED}
AS $fn$
BEGIN
  IF TG_OP IN ('DELETE', 'TRUNCATE') AND current_setting('trustgate.audit_purge', true) = 'on' THEN
    RETURN NULL;
  END IF;
  RAISE EXCEPTION USING ERRCODE = '42501',
    MESSAGE = format('rows of trustgate.%s are audit records: they cannot be changed or deleted', TG_TABLE_NAME),
    HINT = 'Old rows are removed with trustgate.purge_audit(interval).';
END
$fn$;
REVOKE ALL ON FUNCTION trustgate.audit_immutable() FROM PUBLIC;
${table('query_log', QUERY_LOG_COLUMNS)}
${table('access_log', ACCESS_LOG_COLUMNS)}

-- "What did proxy user X (or trusted user T) do between …": btree by user and time; BRIN for
-- plain time ranges (rows arrive roughly in time order, and BRIN stays tiny). The proxy_user index
-- holds only rows with a proxy user (\`proxy_user = 'x'\` implies it), so the many requests without
-- one cost one index insert less; an index of an older version (without the WHERE) is replaced.
DO $do$
BEGIN
  IF EXISTS (SELECT FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
             WHERE c.relnamespace = 'trustgate'::regnamespace AND c.relname = 'query_log_proxy_user_started' AND i.indpred IS NULL) THEN
    DROP INDEX trustgate.query_log_proxy_user_started;
  END IF;
END
$do$;
CREATE INDEX IF NOT EXISTS query_log_proxy_user_started ON trustgate.query_log (proxy_user, started_at) WHERE proxy_user IS NOT NULL;
CREATE INDEX IF NOT EXISTS query_log_trusted_user_started ON trustgate.query_log (trusted_user, started_at);
CREATE INDEX IF NOT EXISTS query_log_started_brin ON trustgate.query_log USING brin (started_at);
CREATE INDEX IF NOT EXISTS access_log_trusted_user_at ON trustgate.access_log (trusted_user, at);
CREATE INDEX IF NOT EXISTS access_log_proxy_user_at ON trustgate.access_log (proxy_user, at);
CREATE INDEX IF NOT EXISTS access_log_decision_at ON trustgate.access_log (decision, at);
CREATE INDEX IF NOT EXISTS access_log_at_brin ON trustgate.access_log USING brin (at);

-- Only the gateway (the auth role) writes, and only INSERT; readers only read.
GRANT INSERT ON trustgate.query_log, trustgate.access_log TO ${auth};
GRANT SELECT ON trustgate.query_log, trustgate.access_log TO ${READERS};

-- The writer's start: ids of a restarted instance continue above what the database holds.
CREATE OR REPLACE FUNCTION trustgate.audit_high_water(instance text) RETURNS bigint
  LANGUAGE sql STABLE SECURITY DEFINER ${PINNED}
AS $fn$
  SELECT greatest((SELECT max(log_id) FROM trustgate.query_log WHERE query_log.instance = $1),
                  (SELECT max(log_id) FROM trustgate.access_log WHERE access_log.instance = $1))
$fn$;
REVOKE ALL ON FUNCTION trustgate.audit_high_water(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION trustgate.audit_high_water(text) TO ${auth};

-- Retention: deletes rows older than the interval from both logs; returns the counts.
CREATE OR REPLACE FUNCTION trustgate.purge_audit(older_than interval)
  RETURNS TABLE (query_log_deleted bigint, access_log_deleted bigint)
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER ${PINNED}
AS $fn$
DECLARE
  cutoff timestamptz;
BEGIN
  IF older_than IS NULL OR older_than < interval '0' THEN
    RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = format('invalid retention interval %L', older_than),
      HINT = 'Pass how old rows must be to go, e.g. interval ''90 days''.';
  END IF;
  cutoff := now() - older_than;
  PERFORM set_config('trustgate.audit_purge', 'on', true);
  DELETE FROM trustgate.query_log WHERE started_at < cutoff;
  GET DIAGNOSTICS query_log_deleted = ROW_COUNT;
  DELETE FROM trustgate.access_log WHERE at < cutoff;
  GET DIAGNOSTICS access_log_deleted = ROW_COUNT;
  PERFORM set_config('trustgate.audit_purge', 'off', true);
  RETURN NEXT;
END
$fn$;
REVOKE ALL ON FUNCTION trustgate.purge_audit(interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION trustgate.purge_audit(interval) TO ${TRUSTGATE_ADMIN_ROLE};

-- Reading views. Derived columns come first, so columns added to the tables later can be
-- appended by CREATE OR REPLACE VIEW. end_user: the proxy user, or the logged-on user without one.
CREATE OR REPLACE VIEW trustgate.query_log_v AS
  SELECT coalesce(q.proxy_user, q.trusted_user) AS end_user,
         (q.result = 'refused' OR q.sqlstate IS NOT DISTINCT FROM '42501') AS refused,
         ${qcols}
  FROM trustgate.query_log q;
CREATE OR REPLACE VIEW trustgate.access_log_v AS
  SELECT coalesce(a.proxy_user, a.trusted_user) AS end_user,
         (a.decision = 'refused') AS refused,
         ${acols}
  FROM trustgate.access_log a;
-- Both logs as one time line: "what did alice do, through which middle tier, as which role, and
-- what was refused" is one WHERE on this view.
CREATE OR REPLACE VIEW trustgate.audit_trail AS
  SELECT 'query'::text AS log, q.instance, q.log_id, q.started_at AS at,
         coalesce(q.proxy_user, q.trusted_user) AS end_user, q.trusted_user, q.proxy_user, q.proxy_role,
         q.query_band, q.database, q.client_addr, q.client_session,
         q.statement_kind AS action, q.result AS outcome, (q.result = 'refused' OR q.sqlstate IS NOT DISTINCT FROM '42501') AS refused,
         q.sqlstate, q.statement_text, NULL::text AS message, q.duration_ms, q.rows
  FROM trustgate.query_log q
  UNION ALL
  SELECT 'access', a.instance, a.log_id, a.at,
         coalesce(a.proxy_user, a.trusted_user), a.trusted_user, a.proxy_user, a.proxy_role,
         a.query_band, a.database, a.client_addr, a.client_session,
         a.event, a.decision, a.decision = 'refused',
         a.sqlstate, a.statement_text, coalesce(a.message, a.detail), NULL::double precision, NULL::bigint
  FROM trustgate.access_log a;
REVOKE ALL ON trustgate.query_log_v, trustgate.access_log_v, trustgate.audit_trail FROM PUBLIC;
GRANT SELECT ON trustgate.query_log_v, trustgate.access_log_v, trustgate.audit_trail TO ${READERS};
${creatorSql()}
`;
}

/**
 * Creators of objects (the seed's rule): made by a PERMANENT proxy user → that user; by an
 * application proxy user → the trusted user; without a proxy → the session user. The event
 * trigger reads the identity through trustgate.identity(), which verifies the MAC, so identity
 * settings written by SQL cannot name a forged creator (the row then says identity 'invalid').
 */
function creatorSql(): string {
  return `
CREATE TABLE IF NOT EXISTS trustgate.object_creator (
  creator_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  classid oid NOT NULL,
  objid oid NOT NULL,
  object_identity text NOT NULL,
  object_type text NOT NULL,
  schema_name text,
  command_tag text NOT NULL,
  creator text NOT NULL,
  creator_source text NOT NULL CHECK (creator_source IN ('permanent_proxy', 'application_proxy', 'session_user')),
  proxy_user text,
  proxy_role text,
  proxy_kind text,
  trusted_user text,
  session_user_name text NOT NULL,
  current_role_name text NOT NULL,
  owner text,
  query_band text,
  identity_status text NOT NULL CHECK (identity_status IN ('none', 'verified', 'invalid')),
  created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS object_creator_object ON trustgate.object_creator (classid, objid, created_at);
CREATE INDEX IF NOT EXISTS object_creator_creator ON trustgate.object_creator (creator, created_at);
REVOKE ALL ON trustgate.object_creator FROM PUBLIC;
GRANT SELECT ON trustgate.object_creator TO ${READERS};
CREATE OR REPLACE TRIGGER object_creator_immutable BEFORE UPDATE OR DELETE OR TRUNCATE ON trustgate.object_creator
  FOR EACH STATEMENT EXECUTE FUNCTION trustgate.audit_immutable();

-- SECURITY DEFINER (the installing superuser) so that it may write the table nobody else may;
-- a failure here is a WARNING, never the user's CREATE failing.
CREATE OR REPLACE FUNCTION trustgate.record_object_creator() RETURNS event_trigger
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER ${PINNED}
AS $fn$
DECLARE
  ident jsonb;
  status text := 'none';
  pu text;
  kind text;
  tu text;
  who text;
  source text;
  role_name text := coalesce(nullif(current_setting('role', true), 'none'), session_user::text);
  cmd record;
  owner_col name;
  owner_name text;
BEGIN
  BEGIN
    ident := trustgate.identity();
    IF ident IS NOT NULL THEN
      status := 'verified';
    END IF;
  EXCEPTION WHEN OTHERS THEN
    -- Settings not made by trustgate: ignored; the session user is the creator.
    ident := NULL;
    status := 'invalid';
  END;
  pu := ident->>'pu';
  kind := ident->>'k';
  tu := CASE WHEN pu IS NOT NULL THEN ident->>'tu' END;
  IF pu IS NULL THEN
    who := session_user::text;
    source := 'session_user';
  ELSIF kind = 'application' THEN
    who := tu;
    source := 'application_proxy';
  ELSE
    who := pu;
    source := 'permanent_proxy';
  END IF;
  FOR cmd IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
    CONTINUE WHEN cmd.objsubid <> 0 OR NOT (cmd.command_tag LIKE 'CREATE %' OR cmd.command_tag = 'SELECT INTO');
    -- The owner as PostgreSQL recorded it: the catalog's *owner column, when it has one.
    owner_name := NULL;
    SELECT a.attname INTO owner_col FROM pg_attribute a
      WHERE a.attrelid = cmd.classid AND a.attnum > 0 AND a.attname::text LIKE '%owner' AND a.atttypid = 'oid'::regtype
      LIMIT 1;
    IF owner_col IS NOT NULL THEN
      EXECUTE format('SELECT %I::regrole::text FROM %s WHERE oid = $1', owner_col, cmd.classid::regclass)
        INTO owner_name USING cmd.objid;
    END IF;
    INSERT INTO trustgate.object_creator (classid, objid, object_identity, object_type, schema_name, command_tag,
        creator, creator_source, proxy_user, proxy_role, proxy_kind, trusted_user, session_user_name,
        current_role_name, owner, query_band, identity_status)
      VALUES (cmd.classid, cmd.objid, cmd.object_identity, cmd.object_type, cmd.schema_name, cmd.command_tag,
        who, source, pu, ident->>'pr', kind, tu, session_user::text,
        role_name, owner_name, ident->>'qb', status);
  END LOOP;
EXCEPTION WHEN OTHERS THEN
  RAISE WARNING 'trustgate could not record the creator of an object: % (SQLSTATE %)', SQLERRM, SQLSTATE;
END
$fn$;
REVOKE ALL ON FUNCTION trustgate.record_object_creator() FROM PUBLIC;
DO $do$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_event_trigger WHERE evtname = '${CREATOR_EVENT_TRIGGER}') THEN
    CREATE EVENT TRIGGER ${CREATOR_EVENT_TRIGGER} ON ddl_command_end
      EXECUTE FUNCTION trustgate.record_object_creator();
  END IF;
END
$do$;

-- The newest creation of each object, with its current name when it still exists.
CREATE OR REPLACE VIEW trustgate.object_creators AS
  SELECT c.object_type, coalesce(i.identity, c.object_identity) AS object_identity, c.schema_name,
         c.creator, c.creator_source, c.proxy_user, c.proxy_role, c.trusted_user, c.owner,
         c.session_user_name, c.current_role_name, c.query_band, c.identity_status, c.created_at,
         (i.identity IS NOT NULL) AS still_exists, c.classid, c.objid
  FROM (SELECT DISTINCT ON (classid, objid) * FROM trustgate.object_creator
        ORDER BY classid, objid, created_at DESC, creator_id DESC) c
  LEFT JOIN LATERAL pg_identify_object(c.classid, c.objid, 0) i ON true;
REVOKE ALL ON trustgate.object_creators FROM PUBLIC;
GRANT SELECT ON trustgate.object_creators TO ${READERS};
`;
}
