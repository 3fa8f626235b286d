/**
 * Summarises a V8 .cpuprofile (node --cpu-prof): top functions by self time and by inclusive
 * time, hottest lines, and self time per file. Locations in dist/*.js are mapped back to src/*.ts
 * through the source maps tsc writes next to them.
 *
 *   npx tsx bench/profile.ts bench/results/latest.cpuprofile [top=30]
 */
import fs from 'node:fs';
import path from 'node:path';
import { SourceMap } from 'node:module';
import { fileURLToPath } from 'node:url';

interface CallFrame {
  functionName: string;
  url: string;
  lineNumber: number;
  columnNumber: number;
}
interface ProfileNode {
  id: number;
  callFrame: CallFrame;
  hitCount?: number;
  children?: number[];
  positionTicks?: { line: number; ticks: number }[];
}
interface CpuProfile {
  nodes: ProfileNode[];
  startTime: number;
  endTime: number;
  samples?: number[];
}

export interface ProfileEntry {
  name: string;
  location: string;
  selfMs: number;
  selfPct: number;
  totalMs: number;
  totalPct: number;
  /** Hottest lines inside the function (self time), mapped to the source. */
  lines: { location: string; pct: number }[];
}

export interface ProfileSummary {
  sampledMs: number;
  samples: number;
  bySelf: ProfileEntry[];
  byTotal: ProfileEntry[];
  byFile: { file: string; selfPct: number }[];
}

class Mapper {
  private readonly maps = new Map<string, { map: SourceMap; lines: string[]; dir: string } | null>();
  constructor(private readonly root: string) {}

  private load(url: string) {
    if (this.maps.has(url)) return this.maps.get(url)!;
    let entry: { map: SourceMap; lines: string[]; dir: string } | null = null;
    try {
      if (url.startsWith('file://')) {
        const file = fileURLToPath(url);
        const mapFile = `${file}.map`;
        if (fs.existsSync(mapFile)) {
          entry = { map: new SourceMap(JSON.parse(fs.readFileSync(mapFile, 'utf8'))), lines: fs.readFileSync(file, 'utf8').split('\n'), dir: path.dirname(file) };
        }
      }
    } catch {
      entry = null;
    }
    this.maps.set(url, entry);
    return entry;
  }

  private rel(p: string): string {
    const abs = p.startsWith('file://') ? fileURLToPath(p) : p;
    const r = path.relative(this.root, abs);
    return r.startsWith('..') ? abs : r;
  }

  /** `line0`/`col0` are 0-based; col0 < 0 means "first code on the line". */
  locate(url: string, line0: number, col0: number): string {
    if (!url) return '(native)';
    const m = this.load(url);
    if (m) {
      const col = col0 >= 0 ? col0 : Math.max(0, (m.lines[line0] ?? '').search(/\S/));
      const e = m.map.findEntry(line0, col) as { originalSource?: string; originalLine?: number };
      if (e && e.originalSource !== undefined && e.originalLine !== undefined) {
        const src = e.originalSource.startsWith('file://') || path.isAbsolute(e.originalSource) ? e.originalSource : path.resolve(m.dir, e.originalSource);
        return `${this.rel(src)}:${e.originalLine + 1}`;
      }
    }
    return `${url.startsWith('file://') ? this.rel(url) : url}:${line0 + 1}`;
  }
}

export function summarizeProfile(file: string, root = process.cwd(), top = 30): ProfileSummary {
  const prof = JSON.parse(fs.readFileSync(file, 'utf8')) as CpuProfile;
  const byId = new Map(prof.nodes.map((n) => [n.id, n]));
  const totalHits = prof.nodes.reduce((s, n) => s + (n.hitCount ?? 0), 0) || 1;
  const sampledMs = (prof.endTime - prof.startTime) / 1000;
  const msPerHit = sampledMs / totalHits;
  const mapper = new Mapper(root);
  const keyOf = (cf: CallFrame) => `${cf.functionName}\u0000${cf.url}\u0000${cf.lineNumber}\u0000${cf.columnNumber}`;

  const self = new Map<string, number>();
  const total = new Map<string, number>();
  const lineTicks = new Map<string, Map<number, number>>();
  const frames = new Map<string, CallFrame>();
  const fileSelf = new Map<string, number>();

  // Inclusive time: each sample counts once for every distinct function on its stack.
  const parent = new Map<number, number>();
  for (const n of prof.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
  for (const n of prof.nodes) {
    const key = keyOf(n.callFrame);
    frames.set(key, n.callFrame);
    const hits = n.hitCount ?? 0;
    if (!hits) continue;
    self.set(key, (self.get(key) ?? 0) + hits);
    const f = n.callFrame.url ? mapper.locate(n.callFrame.url, n.callFrame.lineNumber, n.callFrame.columnNumber).replace(/:\d+$/, '') : `(${n.callFrame.functionName || 'native'})`;
    fileSelf.set(f, (fileSelf.get(f) ?? 0) + hits);
    for (const pt of n.positionTicks ?? []) {
      let m = lineTicks.get(key);
      if (!m) lineTicks.set(key, (m = new Map()));
      m.set(pt.line, (m.get(pt.line) ?? 0) + pt.ticks);
    }
    const seen = new Set<string>();
    for (let id: number | undefined = n.id; id !== undefined; id = parent.get(id)) {
      const k = keyOf(byId.get(id)!.callFrame);
      if (seen.has(k)) continue;
      seen.add(k);
      total.set(k, (total.get(k) ?? 0) + hits);
    }
  }

  const entry = (key: string): ProfileEntry => {
    const cf = frames.get(key)!;
    const s = self.get(key) ?? 0;
    const t = total.get(key) ?? 0;
    const lines = [...(lineTicks.get(key) ?? new Map<number, number>())]
      .sort((a, b) => b[1] - a[1])
      .slice(0, 3)
      .map(([line, ticks]) => ({ location: mapper.locate(cf.url, line - 1, -1), pct: (100 * ticks) / totalHits }));
    return {
      name: cf.functionName || '(anonymous)',
      location: cf.url ? mapper.locate(cf.url, cf.lineNumber, cf.columnNumber) : '(native)',
      selfMs: s * msPerHit,
      selfPct: (100 * s) / totalHits,
      totalMs: t * msPerHit,
      totalPct: (100 * t) / totalHits,
      lines,
    };
  };
  const bySelf = [...self.keys()].sort((a, b) => (self.get(b) ?? 0) - (self.get(a) ?? 0)).slice(0, top).map(entry);
  const byTotal = [...total.keys()]
    .filter((k) => {
      const cf = frames.get(k)!;
      return cf.url !== '' && !['(root)', '(program)', '(idle)', '(garbage collector)'].includes(cf.functionName);
    })
    .sort((a, b) => (total.get(b) ?? 0) - (total.get(a) ?? 0))
    .slice(0, top)
    .map(entry);
  const byFile = [...fileSelf]
    .sort((a, b) => b[1] - a[1])
    .slice(0, 20)
    .map(([f, hits]) => ({ file: f, selfPct: (100 * hits) / totalHits }));
  return { sampledMs, samples: totalHits, bySelf, byTotal, byFile };
}

export function formatProfileSummary(s: ProfileSummary, top = 30): string {
  const pct = (n: number) => `${n.toFixed(1).padStart(5)}%`;
  const out: string[] = [`${s.samples} samples over ${(s.sampledMs / 1000).toFixed(1)} s`, '', 'Top functions by self time:'];
  for (const e of s.bySelf.slice(0, top)) {
    out.push(`  ${pct(e.selfPct)} self ${pct(e.totalPct)} total  ${e.name}  ${e.location}`);
    for (const l of e.lines) if (l.pct >= 0.3) out.push(`           ${pct(l.pct)}  line ${l.location}`);
  }
  out.push('', 'Top functions by inclusive time (JS only):');
  for (const e of s.byTotal.slice(0, top)) out.push(`  ${pct(e.totalPct)} total ${pct(e.selfPct)} self  ${e.name}  ${e.location}`);
  out.push('', 'Self time by file:');
  for (const f of s.byFile) out.push(`  ${pct(f.selfPct)}  ${f.file}`);
  return `${out.join('\n')}\n`;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === path.resolve(process.argv[1])) {
  const file = process.argv[2];
  if (!file) {
    console.error('usage: tsx bench/profile.ts <file.cpuprofile> [top]');
    process.exit(2);
  }
  const top = Number(process.argv[3] ?? 30);
  console.log(formatProfileSummary(summarizeProfile(file, process.cwd(), top), top));
}
