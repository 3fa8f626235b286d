/**
 * The trusted-session policy of one client connection: its session and transaction query bands,
 * the proxy they assert, and whether the CONNECT THROUGH rules allow it. Pure: the client session
 * (mechanism) asks it what identity its server connection must have and applies it.
 *
 * Teradata's rules (research/trusted-sessions.md §1.4–1.7) with PostgreSQL's transaction states:
 * - FOR TRANSACTION only inside a transaction block (25P01 outside, like SET LOCAL would warn);
 *   it ends at commit or rollback and overrides the session band pair by pair.
 * - FOR SESSION cannot change the proxy inside a transaction block (25001).
 * - Under WITH TRUST ONLY, a change of ProxyUser or ProxyRole must come in a trusted request.
 * - A refused statement changes nothing.
 */
import { PgError, SqlState } from '../protocol/sqlstate.js';
import { effectiveBand, mergeBand, type QueryBand, type SetQueryBand } from './query-band.js';
import { authorizeProxy, type ProxyGrant, type TrustedUserRules } from './rules.js';
import { makeIdentity, NO_IDENTITY, type Identity } from './identity.js';

/** 'request': no transaction block, but the band leads a multi-statement request (its transaction). */
export type TxState = 'idle' | 'in-transaction' | 'failed' | 'request';

/** Where the session's rules come from (the rules store of its database). */
export interface RulesSource {
  readonly version: number;
  rulesFor(trustedUser: string): TrustedUserRules | undefined;
}

const q = (name: string): string => `"${name.replace(/"/g, '""')}"`;

export class TrustedSession {
  private sessionBand: QueryBand | null = null;
  private transactionBand: QueryBand | null = null;
  private sessionGrant: ProxyGrant | null = null;
  private transactionGrant: ProxyGrant | null = null;
  private rulesVersion: number;
  /** Why requests are refused now (the rule in force was revoked or changed), or null. */
  private refusal: PgError | null = null;
  private current: Identity = NO_IDENTITY;
  private sessionIdentity: Identity = NO_IDENTITY;

  constructor(
    readonly trustedUser: string,
    private readonly rules: RulesSource,
  ) {
    this.rulesVersion = rules.version;
  }

  /** Has the login user CONNECT THROUGH rules here (so identity statements are off limits)? */
  get isTrustedUser(): boolean {
    return this.rules.rulesFor(this.trustedUser) !== undefined;
  }

  get proxyActive(): boolean {
    return (this.transactionGrant ?? this.sessionGrant) !== null;
  }

  /** The identity for the next request (in a transaction: with its band), after rule changes. */
  identity(): Identity {
    this.catchUp();
    return this.current;
  }

  /** The identity outside any transaction (what session-level settings hold). */
  identityOutsideTransaction(): Identity {
    this.catchUp();
    return this.sessionIdentity;
  }

  /** The error every request gets while the proxy in force is no longer allowed. */
  get refused(): PgError | null {
    this.catchUp();
    return this.refusal;
  }

  /** Rules changed since the proxy was last checked: check it again (cheap when they did not). */
  private catchUp(): void {
    if (this.rulesVersion !== this.rules.version) this.revalidate();
  }

  /**
   * Applies SET QUERY_BAND. Returns whether the proxy (user or role) changed. Throws PgError and
   * changes nothing when refused.
   */
  setQueryBand(stmt: SetQueryBand, trusted: boolean, tx: TxState, stateLeft = false): boolean {
    if (tx === 'failed') {
      throw new PgError(SqlState.InFailedSqlTransaction, 'current transaction is aborted, commands ignored until end of transaction block');
    }
    let session = this.sessionBand;
    let transaction = tx === 'in-transaction' ? this.transactionBand : null;
    if (stmt.scope === 'transaction') {
      if (tx === 'idle') {
        throw new PgError(SqlState.NoActiveSqlTransaction, 'SET QUERY_BAND … FOR TRANSACTION can only be used in transaction blocks', undefined, undefined, 'Run BEGIN first, or use FOR SESSION.');
      }
      transaction = stmt.update && stmt.band ? mergeBand(transaction, stmt.band) : stmt.band;
    } else {
      session = stmt.update && stmt.band ? mergeBand(session, stmt.band) : stmt.band;
    }
    const rules = this.rules.rulesFor(this.trustedUser);
    const before = this.proxyOf(this.sessionBand, transaction === null ? null : this.transactionBand);
    const after = this.proxyOf(session, transaction);
    if (stmt.scope === 'session' && tx === 'in-transaction' && this.proxyOf(this.sessionBand, null) !== this.proxyOf(session, null)) {
      throw new PgError(SqlState.ActiveSqlTransaction, 'SET QUERY_BAND … FOR SESSION cannot change the proxy inside a transaction block', undefined, undefined, 'Use FOR TRANSACTION, or end the transaction first.');
    }
    const proxyChanged = before !== after;
    if (proxyChanged && stateLeft && tx === 'in-transaction') {
      // It cannot be reset inside the transaction, and the next proxy must not see it.
      throw new PgError(
        SqlState.ActiveSqlTransaction,
        'cannot change the proxy inside this transaction block: the current proxy user left session state (temporary objects, prepared statements, cursors, locks or settings)',
        undefined,
        undefined,
        'End the transaction first; the state is cleared before the next proxy user.',
      );
    }
    if (proxyChanged && rules?.trustOnly && !trusted) {
      throw new PgError(
        SqlState.InsufficientPrivilege,
        `trusted user ${q(this.trustedUser)} accepts proxy changes only in trusted requests (WITH TRUST ONLY)`,
        undefined,
        undefined,
        'Mark the request with the trusted user\'s trust key (see docs/trusted-sessions.md, "Trusted requests").',
      );
    }
    const sessionGrant = authorizeProxy(this.trustedUser, rules, session?.proxyUser, session?.proxyRole);
    const effective = effectiveBand(session, transaction);
    const transactionGrant = transaction ? authorizeProxy(this.trustedUser, rules, effective?.proxyUser, effective?.proxyRole) : null;
    this.sessionBand = session;
    this.transactionBand = transaction;
    this.sessionGrant = sessionGrant;
    this.transactionGrant = transactionGrant;
    this.refusal = null;
    this.rulesVersion = this.rules.version;
    this.rebuild();
    return proxyChanged;
  }

  /** The transaction ended: its band (and proxy) with it. Returns whether the proxy changed. */
  endTransaction(): boolean {
    if (this.transactionBand === null) return false;
    const changed = this.proxyOf(this.sessionBand, this.transactionBand) !== this.proxyOf(this.sessionBand, null);
    this.transactionBand = null;
    this.transactionGrant = null;
    // A refusal may have come from the transaction's proxy: decide again from the session band.
    this.revalidate();
    return changed;
  }

  /** The whole state, to put back if PostgreSQL refuses a switch the rules allowed (see restore). */
  snapshot(): object {
    return { ...this };
  }

  restore(snapshot: object): void {
    Object.assign(this, snapshot);
  }

  /** Rules changed: the proxy in force must still be allowed, on the very next request. */
  private revalidate(): void {
    this.rulesVersion = this.rules.version;
    const rules = this.rules.rulesFor(this.trustedUser);
    try {
      this.sessionGrant = authorizeProxy(this.trustedUser, rules, this.sessionBand?.proxyUser, this.sessionBand?.proxyRole);
      const effective = effectiveBand(this.sessionBand, this.transactionBand);
      this.transactionGrant = this.transactionBand ? authorizeProxy(this.trustedUser, rules, effective?.proxyUser, effective?.proxyRole) : null;
      this.refusal = null;
      this.rebuild();
    } catch (err) {
      this.refusal = err as PgError;
    }
  }

  private rebuild(): void {
    this.sessionIdentity = makeIdentity(this.sessionGrant, this.sessionBand, null, this.sessionBand);
    this.current = this.transactionBand
      ? makeIdentity(this.transactionGrant, this.sessionBand, this.transactionBand, effectiveBand(this.sessionBand, this.transactionBand))
      : this.sessionIdentity;
  }

  /** ProxyUser and ProxyRole in force for these bands, as one comparable string. */
  private proxyOf(session: QueryBand | null, transaction: QueryBand | null): string {
    const band = effectiveBand(session, transaction);
    const role = band?.proxyRole;
    return `${band?.proxyUser ?? ''}\u0001${role ? (role.kind === 'role' ? role.name : role.kind) : ''}`;
  }
}
