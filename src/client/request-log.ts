/**
 * One client session's requests as the query log and access log see them (docs/audit.md).
 *
 * A request is what one ReadyForQuery answers: a simple Query, a FunctionCall, or an
 * extended-protocol batch up to its Sync. It opens when its first message arrives from the client
 * and closes at the ReadyForQuery the client receives for it; CommandComplete and ErrorResponse
 * in between give its rows, kind and SQLSTATE. The server answers requests in order, so replies
 * always belong to the oldest open request. Only built when audit is on; the session calls
 * `fromClient` for each client message (once, on arrival) and `toClient` for each message the
 * client receives.
 */
import { Backend, Frontend } from '../protocol/constants.js';
import { decodeError } from '../protocol/backend.js';
import { decodeBindNames, decodeParse, decodeQuery } from '../protocol/frontend.js';
import type { AuditLog } from '../audit/audit-log.js';
import type { AccessEvent, QueryLogInput } from '../audit/records.js';
import type { Identity } from '../trust/identity.js';
import { isQueryBandStatement, parseSetQueryBand, splitQueryBandRequest, type ProxyRole } from '../trust/query-band.js';
import { splitTrustedMarking } from '../trust/trusted-request.js';
import type { ProxyGrant } from '../trust/rules.js';

export interface SessionFacts {
  readonly id: string;
  readonly remote: string;
  readonly user: string;
  readonly database: string;
  readonly poolMode: string;
}

interface OpenRequest {
  startedAt: number;
  texts: string[];
  kind: string | null;
  rows: number | null;
  sqlstate: string | null;
  bytesIn: number;
  bytesOut: number;
  identity: Identity | null;
  trusted: boolean;
  /** The gateway refused it (its error is the gateway's, not a privilege check of PostgreSQL). */
  refused: boolean;
  /** A lone Sync: answered, but not a request of its own. */
  placeholder: boolean;
  /** An access-log event decided by the request's outcome (GRANT/REVOKE CONNECT THROUGH). */
  accessOnEnd: { event: AccessEvent; text: string } | null;
  /** Message of the first error. */
  message: string | null;
  /** A CommandComplete was seen. */
  completed: boolean;
  /** A SET QUERY_BAND of this request took effect (its kind is then 'SET QUERY_BAND'). */
  band: boolean;
  /**
   * A band whose switch PostgreSQL must confirm (ProxyRole naming a role under WITHOUT ROLE): the
   * decision is the request's outcome — granted at its first CommandComplete, refused at an error
   * before it (the identity then stays what it was).
   */
  pendingBand: { before: Identity | null; grant: ProxyGrant } | null;
}

/** What a refused SET QUERY_BAND asked for (the band's ProxyUser and ProxyRole). */
export interface RequestedProxy {
  readonly proxyUser?: string;
  readonly proxyRole?: ProxyRole;
}

const MARKING = '/*trustgate:trusted=';
/** A trusted-request marking up to its end (or the end of the text): its key is never logged. */
const MARKING_RE = /\/\*trustgate:trusted=[\s\S]*?(?:\*\/|$)/g;

/** The text with the key of every trusted-request marking replaced (the marking itself stays visible). */
export function redactMarkings(text: string): string {
  return text.includes(MARKING) ? text.replace(MARKING_RE, '/*trustgate:trusted=(redacted)*/') : text;
}

const roleLabelOf = (r: ProxyRole | undefined): string | null => (!r ? null : r.kind === 'role' ? r.name : r.kind === 'all' ? 'ALL' : 'NONE');

/** Named statements remembered for their text (bounded: the oldest go first). */
const MAX_STATEMENT_TEXTS = 1000;

export class RequestLog {
  private readonly open: OpenRequest[] = [];
  /** The extended-protocol batch being received (already in `open`), or null. */
  private batch: OpenRequest | null = null;
  private readonly statementTexts = new Map<string, string>();

  constructor(
    private readonly audit: AuditLog,
    private readonly facts: SessionFacts,
    /** The identity a request runs under (trusted sessions), or null without them. */
    private readonly identity: () => Identity | null,
    /** Strict audit (`audit.synchronous`): the client's reply waits for this record to be safe. */
    private readonly holdReply: (recordSafe: Promise<unknown>) => void,
  ) {}

  /** A client message arrived (called once per message, before the session acts on it). */
  fromClient(type: number, buf: Buffer, start: number, end: number): void {
    const size = end - start;
    switch (type) {
      case Frontend.Query:
        this.batch = null;
        this.begin(size).texts.push(redactMarkings(decodeQuery(buf, start, end)));
        return;
      case Frontend.FunctionCall:
        this.batch = null;
        this.begin(size).kind = 'FUNCTION CALL';
        return;
      case Frontend.Sync:
        if (this.batch) this.batch.bytesIn += size;
        else this.begin(size).placeholder = true;
        this.batch = null;
        return;
      case Frontend.Parse: {
        const r = this.inBatch(size);
        const p = decodeParse(buf, start, end);
        const text = redactMarkings(p.query);
        r.texts.push(text);
        if (p.name !== '') this.rememberStatement(p.name, text);
        return;
      }
      case Frontend.Bind: {
        const r = this.inBatch(size);
        const name = decodeBindNames(buf, start, end).statement;
        const text = name === '' ? null : this.statementTexts.get(name);
        if (text && !r.texts.includes(text)) r.texts.push(text);
        return;
      }
      case Frontend.Describe:
      case Frontend.Execute:
      case Frontend.Close:
      case Frontend.Flush:
        this.inBatch(size);
        return;
      default: {
        // COPY data and anything else count towards the newest request.
        const last = this.open[this.open.length - 1];
        if (last) last.bytesIn += size;
      }
    }
  }

  /** A message went to the client. */
  toClient(type: number, buf: Buffer, start: number, end: number): void {
    const r = this.open[0];
    if (!r) return;
    r.bytesOut += end - start;
    if (type === Backend.CommandComplete) {
      if (r.pendingBand) this.bandDecided(r, null, null);
      r.completed = true;
      this.noteTag(r, buf.toString('latin1', start + 5, end - 1));
    } else if (type === Backend.ErrorResponse) {
      if (r.sqlstate === null) {
        const e = decodeError(buf, start, end);
        r.sqlstate = e.code;
        r.message = e.message;
        if (r.pendingBand && !r.completed) this.bandDecided(r, e.code, e.message);
        // A refused GRANT/REVOKE CONNECT THROUGH is logged as such (at the end), not twice.
        else if (e.code === '42501' && !r.refused && !r.accessOnEnd) this.access(r, 'server_refused', 'refused', { sqlstate: e.code, message: e.message });
      }
    } else if (type === Backend.ReadyForQuery) {
      this.open.shift();
      if (this.batch === r) this.batch = null;
      this.finish(r);
    }
  }

  /**
   * The session ended with requests still open (the client or the server connection went away):
   * they are recorded as failed with 08006, so no request that reached trustgate goes unlogged.
   */
  closeAll(): void {
    for (const r of this.open.splice(0)) {
      r.sqlstate ??= '08006';
      this.finish(r);
    }
    this.batch = null;
  }

  /** Several whole messages made by the gateway (iterates their headers). */
  toClientMessages(b: Buffer): void {
    for (let pos = 0; pos + 5 <= b.length; ) {
      const end = pos + 1 + b.readInt32BE(pos + 1);
      this.toClient(b[pos], b, pos, end);
      pos = end;
    }
  }

  /** The newest request came as a trusted request (verified marking). */
  trustedRequest(): void {
    const r = this.newest();
    if (r) r.trusted = true;
  }

  /** A SET QUERY_BAND of the newest request took effect: it is logged under the new identity. */
  bandSet(before: ProxyGrant | null): void {
    const r = this.newest();
    if (!r) return;
    const previous = r.identity;
    r.identity = this.identity();
    r.band = true;
    const grant = r.identity?.grant ?? null;
    if (grant && (grant.proxyUser !== before?.proxyUser || grant.roleLabel !== before?.roleLabel || grant.targetRole !== before?.targetRole)) {
      // PostgreSQL decides a membership the gateway cannot know: wait for its answer.
      if (grant.memberCheck) r.pendingBand = { before: previous, grant };
      else this.access(r, 'proxy_granted', 'granted', { rule: ruleOf(grant) });
    }
  }

  /**
   * The gateway refused the newest request. `requested`: the band of a refused SET QUERY_BAND
   * (the proxy user and role it asked for are logged, not the ones in force).
   */
  refused(event: AccessEvent | null, sqlstate: string, message: string, requested?: RequestedProxy | null): void {
    const r = this.newest();
    if (!r) return;
    r.refused = true;
    if (!event) return;
    // A marking with a wrong key is refused before its band is read: read it here, for the log.
    const band = requested ?? (event === 'untrusted_refused' && r.texts.length === 1 ? bandOf(r.texts[0]) : null);
    const asked = band !== null && (band.proxyUser !== undefined || band.proxyRole !== undefined);
    this.access(r, event, 'refused', {
      sqlstate,
      message,
      ...(asked ? { proxyUser: band.proxyUser, proxyRole: roleLabelOf(band.proxyRole), proxyRoleGiven: band.proxyUser !== undefined } : {}),
    });
  }

  /** The switch of a pending band was answered: granted (code null) or refused by PostgreSQL. */
  private bandDecided(r: OpenRequest, code: string | null, message: string | null): void {
    const pending = r.pendingBand!;
    r.pendingBand = null;
    const grant = pending.grant;
    if (code === null) {
      this.access(r, 'proxy_granted', 'granted', { rule: ruleOf(grant) });
      return;
    }
    // The band did not take effect (the session put the previous one back).
    r.identity = pending.before;
    r.refused = true;
    r.band = false;
    if (code === '42501') {
      this.access(r, 'proxy_refused', 'refused', { sqlstate: code, message: message ?? undefined, proxyUser: grant.proxyUser, proxyRole: grant.roleLabel ?? grant.targetRole, proxyRoleGiven: true, rule: ruleOf(grant) });
    }
  }

  /** The newest request is a GRANT/REVOKE CONNECT THROUGH: logged once its outcome is known. */
  connectThrough(kind: 'grant' | 'revoke', text: string): void {
    const r = this.newest();
    if (r) r.accessOnEnd = { event: kind === 'grant' ? 'connect_through_grant' : 'connect_through_revoke', text };
  }

  private begin(size: number): OpenRequest {
    const r: OpenRequest = {
      startedAt: Date.now(),
      texts: [],
      kind: null,
      rows: null,
      sqlstate: null,
      bytesIn: size,
      bytesOut: 0,
      identity: this.identity(),
      trusted: false,
      refused: false,
      placeholder: false,
      accessOnEnd: null,
      message: null,
      completed: false,
      band: false,
      pendingBand: null,
    };
    this.open.push(r);
    return r;
  }

  private inBatch(size: number): OpenRequest {
    if (this.batch) {
      this.batch.bytesIn += size;
      return this.batch;
    }
    this.batch = this.begin(size);
    return this.batch;
  }

  private newest(): OpenRequest | undefined {
    return this.open[this.open.length - 1];
  }

  private rememberStatement(name: string, text: string): void {
    this.statementTexts.delete(name);
    this.statementTexts.set(name, text);
    if (this.statementTexts.size > MAX_STATEMENT_TEXTS) this.statementTexts.delete(this.statementTexts.keys().next().value!);
  }

  /** "INSERT 0 5" → kind INSERT, 5 rows; the first statement's kind names a multi-statement request. */
  private noteTag(r: OpenRequest, tag: string): void {
    const space = tag.indexOf(' ');
    const word = space < 0 ? tag : tag.slice(0, space);
    // A SET QUERY_BAND the gateway answered (alone or leading the request) is of its own kind.
    r.kind ??= word === 'SET' && r.band ? 'SET QUERY_BAND' : word === 'CREATE' || word === 'DROP' || word === 'ALTER' ? tag.replace(/ \d+$/, '') : word;
    const last = tag.lastIndexOf(' ');
    if (last > 0) {
      const n = Number(tag.slice(last + 1));
      if (Number.isInteger(n)) r.rows = (r.rows ?? 0) + n;
    }
  }

  private finish(r: OpenRequest): void {
    if (r.placeholder && r.texts.length === 0) return;
    if (r.pendingBand) this.bandDecided(r, r.sqlstate, r.message);
    if (r.accessOnEnd) {
      this.access(r, r.accessOnEnd.event, r.sqlstate ? 'refused' : 'granted', { sqlstate: r.sqlstate, message: r.message ?? undefined, statementText: r.accessOnEnd.text });
    }
    const id = r.identity;
    const grant = id?.grant ?? null;
    const endedAt = Date.now();
    const record: QueryLogInput = {
      clientAddr: this.facts.remote,
      clientSession: this.facts.id,
      database: this.facts.database,
      trustedUser: this.facts.user,
      proxyUser: grant?.proxyUser ?? null,
      proxyRole: grant ? (grant.roleLabel ?? grant.targetRole) : null,
      proxyKind: grant?.kind ?? null,
      queryBand: id?.band?.toString() ?? null,
      transactionBand: id?.transactionBand?.toString() ?? null,
      sessionBand: id?.sessionBand?.toString() ?? null,
      statementText: r.texts.length === 0 ? null : r.texts.join(';\n'),
      statementKind: r.kind,
      startedAt: r.startedAt,
      endedAt,
      rows: r.rows,
      sqlstate: r.sqlstate,
      result: r.refused ? 'refused' : r.sqlstate === '57014' ? 'canceled' : r.sqlstate ? 'error' : 'ok',
      bytesIn: r.bytesIn,
      bytesOut: r.bytesOut,
      poolMode: this.facts.poolMode,
      trustedRequest: r.trusted,
    };
    if (this.audit.synchronous) this.holdReply(this.audit.queryAndWait(record));
    else this.audit.query(record);
  }

  private access(
    r: OpenRequest,
    event: AccessEvent,
    decision: 'granted' | 'refused',
    more: {
      sqlstate?: string | null;
      message?: string;
      rule?: unknown;
      statementText?: string;
      /** The proxy user asked for (refusals); the one in force when undefined. */
      proxyUser?: string | null;
      proxyRole?: string | null;
      /** proxyRole is what was asked for, even when null (a ProxyUser without ProxyRole). */
      proxyRoleGiven?: boolean;
    },
  ): void {
    const id = r.identity;
    const grant = id?.grant ?? null;
    const inForce = grant ? (grant.roleLabel ?? grant.targetRole) : null;
    this.audit.access({
      clientAddr: this.facts.remote,
      clientSession: this.facts.id,
      database: this.facts.database,
      trustedUser: this.facts.user,
      proxyUser: more.proxyUser ?? grant?.proxyUser ?? null,
      proxyRole: more.proxyRole ?? (more.proxyRoleGiven ? null : inForce),
      queryBand: id?.band?.toString() ?? null,
      event,
      decision,
      rule: more.rule,
      sqlstate: more.sqlstate ?? null,
      message: more.message ?? null,
      statementText: more.statementText ?? (r.texts.length === 0 ? null : r.texts.join(';\n')),
    });
  }
}

function ruleOf(grant: ProxyGrant): { kind: string; proxyRole: string | null; role: string } {
  return { kind: grant.kind, proxyRole: grant.roleLabel, role: grant.targetRole };
}

/** The band a (marked) SET QUERY_BAND request text asks for, or null. */
function bandOf(text: string): RequestedProxy | null {
  const sql = splitTrustedMarking(text)?.rest ?? text;
  if (!isQueryBandStatement(sql)) return null;
  try {
    return parseSetQueryBand(splitQueryBandRequest(sql).statement).band;
  } catch {
    return null;
  }
}
