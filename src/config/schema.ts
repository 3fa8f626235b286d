/**
 * The configuration model, validated with zod. Keys are snake_case in the file and in code, so
 * error messages name exactly the key a user wrote. Documented in docs/configuration.md.
 */
import { z } from 'zod';

const port = z.number().int().min(0).max(65535);
const ms = z.number().int().min(0);

export const serverTlsSchema = z
  .object({
    /** libpq-style sslmode towards PostgreSQL. */
    mode: z.enum(['disable', 'prefer', 'require', 'verify-ca', 'verify-full']).default('prefer'),
    /** CA bundle used to verify the server certificate (verify-ca, verify-full). */
    ca_file: z.string().optional(),
    /** Client certificate and key presented to PostgreSQL, if it asks for one. */
    cert_file: z.string().optional(),
    key_file: z.string().optional(),
    /** Name checked against the certificate with verify-full; defaults to the server host. */
    server_name: z.string().optional(),
  })
  .strict();

export const serverSchema = z
  .object({
    host: z.string().min(1).default('127.0.0.1'),
    port: port.default(5432),
    tls: serverTlsSchema.prefault({}),
    connect_timeout_ms: ms.default(10_000),
  })
  .strict();

export const poolModeSchema = z.enum(['session', 'transaction']);

/**
 * How a route's clients reach PostgreSQL (docs/security-modes.md): `pooled` (trustgate
 * authenticates the client and lends pooled server connections; trusted sessions work here),
 * `relay` (the server authenticates the client through trustgate, which holds no secret),
 * `passthrough` (TLS end to end between client and server; trustgate only routes).
 */
export const securityModeSchema = z.enum(['pooled', 'relay', 'passthrough']);

export const databaseSchema = z
  .object({
    /** Database name on the server; defaults to the name the client asked for. */
    dbname: z.string().min(1).optional(),
    host: z.string().min(1).optional(),
    port: port.optional(),
    pool_mode: poolModeSchema.optional(),
    pool_size: z.number().int().min(1).optional(),
    /** `relay` makes the server authenticate this database's clients (passthrough is chosen by SNI or listener). */
    security: securityModeSchema.exclude(['passthrough']).optional(),
  })
  .strict();

export const userRouteSchema = z
  .object({
    /** `relay` makes the server authenticate this user (wins over the database's and the listener's mode). */
    security: securityModeSchema.exclude(['passthrough']).optional(),
  })
  .strict();

const passthroughServerSchema = z
  .object({
    host: z.string().min(1),
    port: port.default(5432),
  })
  .strict();

export const passthroughSchema = z
  .object({
    /**
     * TLS server name (SNI) → the PostgreSQL server that terminates this client's TLS itself.
     * Names are matched case-insensitively and exactly (no wildcards).
     */
    servers: z.record(z.string().min(1), passthroughServerSchema).default({}),
    /**
     * A TLS client whose server name is missing or not in `servers`, on a `passthrough` listener:
     * `refuse` (TLS alert unrecognized_name, connection closed) or `server` (pass it through to
     * `server.host`:`server.port`). On other listeners such a client is served by trustgate's own TLS.
     */
    unmatched: z.enum(['refuse', 'server']).default('refuse'),
    /** On a `passthrough` listener, relay GSSENCRequest to `server` (GSSAPI encryption end to end). */
    gssenc: z.boolean().default(false),
  })
  .strict();

export const relaySchema = z
  .object({
    /**
     * After the server accepted the client: `forward` (the session is spliced to that server
     * connection, byte for byte, until either side closes) or `pool` (the authenticated server
     * connection joins the user's pool and the client continues as a pooled client).
     */
    after_auth: z.enum(['forward', 'pool']).default('forward'),
  })
  .strict();

export const authSchema = z
  .object({
    /**
     * How clients authenticate to trustgate. `cert`: a TLS client certificate signed by tls.ca_file
     * whose common name is the user name.
     */
    method: z.enum(['scram-sha-256', 'md5', 'password', 'trust', 'cert']).default('scram-sha-256'),
    /** YAML file mapping user names to SCRAM verifiers or md5 hashes (never plaintext). */
    users_file: z.string().optional(),
    /** Look secrets up in the server with this query ($1 = user name) run as `auth.user`. */
    query: z.string().default('SELECT username, secret FROM trustgate.user_secret($1)'),
    /** The role that runs the auth query; its own secret comes from the users file or an env var. */
    user: z.string().optional(),
    /** Name of the environment variable holding `auth.user`'s password (never the password itself). */
    password_env: z.string().default('TRUSTGATE_AUTH_PASSWORD'),
    /** Database the auth query runs in; defaults to the database the client asked for. */
    database: z.string().optional(),
  })
  .strict();

export const poolSchema = z
  .object({
    mode: poolModeSchema.default('transaction'),
    /** Server connections per (database, user) pool. */
    default_size: z.number().int().min(1).default(20),
    /** Idle server connections kept open per pool even when unused. */
    min_size: z.number().int().min(0).default(0),
    /** Upper bound on server connections per server database, across users (0 = none). */
    max_db_connections: z.number().int().min(0).default(0),
    /** Clients connected to the gateway at once; more are refused with 53300. */
    max_client_connections: z.number().int().min(1).default(10_000),
    /** How long a client waits in the queue for a server connection before 53300/57014. */
    wait_timeout_ms: ms.default(30_000),
    /** Close server connections idle for longer than this (0 = never). */
    idle_timeout_ms: ms.default(600_000),
    /** Close server connections older than this when they are next idle (0 = never). */
    lifetime_ms: ms.default(3_600_000),
    /** Check an idle server connection with an empty query if it was idle for longer than this. */
    health_check_after_ms: ms.default(30_000),
    /** Protocol-level prepared statements kept per server connection in transaction mode. */
    max_prepared_statements: z.number().int().min(0).default(200),
    /** Run the full reset after every transaction in transaction mode, not only after state changes. */
    reset_always: z.boolean().default(false),
  })
  .strict();

export const clientTlsSchema = z
  .object({
    /** disable: answer SSLRequest with N; allow: TLS when asked; require: refuse clients without TLS. */
    mode: z.enum(['disable', 'allow', 'require']).default('disable'),
    cert_file: z.string().optional(),
    key_file: z.string().optional(),
    /** CA for client certificates (optional). */
    ca_file: z.string().optional(),
  })
  .strict()
  .refine((t) => t.mode === 'disable' || (t.cert_file && t.key_file), {
    message: 'tls.cert_file and tls.key_file are required when tls.mode is not disable',
  });

export const limitsSchema = z
  .object({
    /** Largest protocol message accepted from a client (bytes). */
    max_message_bytes: z.number().int().min(1024).default(64 * 1024 * 1024),
    /** A client must finish startup and authentication within this time. */
    startup_timeout_ms: ms.default(15_000),
  })
  .strict();

/** Query log, access log and JSON lines (docs/audit.md). */
export const auditSchema = z
  .object({
    /** Record every request (query log) and privilege decision (access log). */
    enabled: z.boolean().default(false),
    /** Insert into trustgate.query_log / access_log (needs auth.user and `trustgate init`). */
    database: z.boolean().default(true),
    /** Server database holding the logs (one per gateway); default auth.database, else postgres. */
    database_name: z.string().min(1).optional(),
    /** This gateway in the logs' `instance` column; unique per running gateway. Default hostname:listen.port. */
    instance: z.string().min(1).max(200).optional(),
    /** Statement text stored: full, the first truncate_at characters, only a fingerprint, or nothing. */
    statement_text: z.enum(['full', 'truncate', 'fingerprint', 'none']).default('full'),
    truncate_at: z.number().int().min(1).default(4096),
    /** Bind parameter values are stored only when this is true. */
    log_parameters: z.boolean().default(false),
    /** A batch is written at least this often (and at once when batch_size records are queued). */
    flush_interval_ms: z.number().int().min(1).default(100),
    batch_size: z.number().int().min(1).max(100_000).default(1000),
    /** Local spool while the database cannot take records; default os.tmpdir()/trustgate-spool-<instance>. */
    spool_dir: z.string().min(1).optional(),
    /** A batch the database has not committed within this time goes to the spool instead. */
    spool_after_ms: z.number().int().min(1).default(2000),
    /** Records held in memory at most (database and spool both failing), then on_overflow applies. */
    max_queue_records: z.number().int().min(1).default(100_000),
    /** refuse: new requests are refused (53400) until the queue drains; drop: records are dropped, counted, logged as errors. */
    on_overflow: z.enum(['refuse', 'drop']).default('refuse'),
    /** Strict audit: a request's reply waits until its record is committed or fsync'd to the spool. */
    synchronous: z.boolean().default(false),
    /** Also (or, with database: false, only) write JSON lines: path '-' = stdout, else a file appended to. */
    json_lines: z
      .object({
        path: z.string().min(1),
        /** Bytes waiting for a slow destination before records are dropped (counted, logged). */
        max_buffer_bytes: z.number().int().min(65_536).default(16 * 1024 * 1024),
      })
      .strict()
      .optional(),
  })
  .strict();

export const configSchema = z
  .object({
    listen: z
      .object({
        host: z.string().min(1).default('127.0.0.1'),
        port: port.default(6432),
        /** Security mode of this listener's clients unless a user, database or SNI route says otherwise. */
        security: securityModeSchema.default('pooled'),
      })
      .strict()
      .prefault({}),
    server: serverSchema.prefault({}),
    tls: clientTlsSchema.prefault({}),
    auth: authSchema.prefault({}),
    pool: poolSchema.prefault({}),
    limits: limitsSchema.prefault({}),
    /** Per-database overrides keyed by the name clients use. */
    databases: z.record(z.string(), databaseSchema).default({}),
    /** Per-user routes keyed by user name (security mode). */
    users: z.record(z.string(), userRouteSchema).default({}),
    passthrough: passthroughSchema.prefault({}),
    relay: relaySchema.prefault({}),
    /** Roles allowed to use the admin console (database `trustgate`). */
    admin_users: z.array(z.string()).default([]),
    log: z
      .object({
        level: z.enum(['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent']).default('info'),
      })
      .strict()
      .prefault({}),
    trusted_sessions: z
      .object({
        /**
         * When the proxy user changes or ends, reset the server connection if the last proxy left
         * session state the SQL classifier saw (`detected`), or whenever the proxy ran any SQL
         * (`always`: also covers state made inside server-side functions, at the cost of a reset).
         */
        reset_after_proxy: z.enum(['detected', 'always']).default('detected'),
      })
      .strict()
      .prefault({}),
    audit: auditSchema.prefault({}),
    /** On SIGTERM, wait this long for clients to finish before closing them. */
    shutdown_timeout_ms: ms.default(30_000),
  })
  .strict()
  .refine((c) => !c.audit.enabled || !c.audit.database || Boolean(c.auth.user), {
    message: 'audit.database needs auth.user: the logs are written by the auth role (or set audit.database: false and audit.json_lines)',
    path: ['audit', 'database'],
  })
  .refine((c) => !c.audit.enabled || c.audit.database || Boolean(c.audit.json_lines), {
    message: 'audit is enabled with no destination: set audit.database: true or audit.json_lines',
    path: ['audit', 'json_lines'],
  })
  .refine((c) => c.auth.method !== 'cert' || (c.tls.mode === 'require' && Boolean(c.tls.ca_file)), {
    message: 'auth.method cert needs tls.mode require and tls.ca_file (the CA of client certificates)',
    path: ['auth', 'method'],
  });

export type Config = z.infer<typeof configSchema>;
export type ConfigInput = z.input<typeof configSchema>;
export type PoolMode = z.infer<typeof poolModeSchema>;
export type DatabaseConfig = z.infer<typeof databaseSchema>;
export type SecurityMode = z.infer<typeof securityModeSchema>;
