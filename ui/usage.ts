import { adminToken } from './admin.js'
import { meanOf, StackedBars, Timeline, type StackedData } from './charts.js'
import { el, find, keyed, setAttr, setClass, setText } from './dom.js'

/*
 * The Usage view (CONTRACT 17): tokens per hour by client and by model (the last 24 hours or
 * 30 days), each GPU's busy share over the last hour, and each API key's use of its token budget.
 * It reads what the operator could read: `../admin/usage`, `../admin/gpu-timeline` and
 * `../admin/api-keys` (relative, so it works under any prefix), with the token typed into this
 * tab, again every 10 seconds while the view is open.
 */

const REFRESH_MS = 10_000
const HOUR_MS = 3_600_000
/** More series than this in a stack: the smallest are summed as "others". */
const STACK_MAX = 8
const WINDOWS = { day: { hours: 24, words: 'last 24 h' }, month: { hours: 24 * 30, words: 'last 30 days' } } as const
type WindowName = keyof typeof WINDOWS

interface UsageRow { hour?: string, client?: string, model?: string, promptTokens: number, outputTokens: number }
interface TimelineAnswer { from: string, bucketSeconds: number, observedSince: string | null, gpus: Array<{ id: string, name: string, computer: string, busy: Array<number | null> }> }
interface KeyRow { name: string, revokedAt?: string | null, tokensPerDay?: number | null, tokensPerMonth?: number | null, usedToday?: number, usedThisMonth?: number }

class AnswerError extends Error {
  constructor (readonly status: number, message: string) { super(message) }
}

async function read<T> (path: string): Promise<T> {
  const headers: Record<string, string> = { accept: 'application/json' }
  const token = adminToken()
  if (token != null) headers.authorization = `Bearer ${token}`
  const res = await fetch(`../admin/${path}`, { headers, cache: 'no-store' })
  const body = await res.json().catch(() => undefined) as { error?: unknown } | undefined
  if (!res.ok) throw new AnswerError(res.status, typeof body?.error === 'string' ? body.error : `${res.status} ${res.statusText}`)
  return body as T
}

const numbers = new Intl.NumberFormat()
const exact = (n: number): string => numbers.format(Math.round(n))
function short (n: number): string {
  if (n >= 1e9) return `${+(n / 1e9).toFixed(1)}G`
  if (n >= 1e6) return `${+(n / 1e6).toFixed(1)}M`
  if (n >= 1e3) return `${+(n / 1e3).toFixed(1)}k`
  return String(+n.toFixed(1))
}
const hourWords = (seconds: number): string => new Date(seconds * 1000).toLocaleString([], { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' })
const minuteWords = (seconds: number): string => new Date(seconds * 1000).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' })

/** Rows of `groupBy=hour,<dimension>` as a stack per hour: the largest series first, the smallest summed past STACK_MAX. */
export function tokensPerHour (rows: UsageRow[], dimension: 'client' | 'model', fromMs: number, hours: number): StackedData {
  const x = Array.from({ length: hours }, (_, i) => (fromMs + i * HOUR_MS) / 1000)
  const byName = new Map<string, number[]>()
  for (const row of rows) {
    const at = Date.parse(row.hour ?? '')
    const i = Math.round((at - fromMs) / HOUR_MS)
    if (!(i >= 0 && i < hours)) continue
    const name = row[dimension] === '' ? '(none)' : row[dimension] ?? '?'
    let values = byName.get(name)
    if (values === undefined) byName.set(name, values = new Array<number>(hours).fill(0))
    values[i] += row.promptTokens + row.outputTokens
  }
  const total = (v: number[]): number => v.reduce((a, b) => a + b, 0)
  const series: Array<{ label: string, values: number[], total: number, rest?: boolean }> = [...byName].map(([label, values]) => ({ label, values, total: total(values) }))
    .filter((s) => s.total > 0)
    .sort((a, b) => b.total - a.total || a.label.localeCompare(b.label))
  if (series.length > STACK_MAX) {
    const rest = series.splice(STACK_MAX - 1)
    const values = new Array<number>(hours).fill(0)
    for (const s of rest) s.values.forEach((v, i) => { values[i] += v })
    series.push({ label: `${rest.length} others`, values, total: total(values), rest: true })
  }
  return { x, stepSeconds: HOUR_MS / 1000, series: series.map(({ label, values, rest }) => ({ label, values, rest })) }
}

let windowName: WindowName = 'day'
let timer: number | undefined
let loading: Promise<void> | undefined
let charts: { client: StackedBars, model: StackedBars, gpus: Timeline } | undefined

/** A panel's message: why it shows nothing (empty, refused, failed). */
function note (panel: string, words: string): void {
  const box = find(document, `#${panel} .chart-note`)
  setText(box, words)
  box.hidden = words === ''
}

function failed (panel: string, err: unknown): void {
  if (err instanceof AnswerError && err.status === 401) {
    note(panel, 'This needs the admin token: enter it with “Edit fleet”.')
  } else {
    note(panel, `Could not be read: ${(err as Error).message}`)
  }
}

function showTokens (panel: string, chart: StackedBars, data: StackedData): void {
  const empty = data.series.length === 0
  find(document, `#${panel} .chart`).hidden = empty
  if (empty) chart.clear()
  else chart.show(data)
  note(panel, empty ? `No tokens counted in the ${WINDOWS[windowName].words}.` : '')
}

function showTimeline (chart: Timeline, answer: TimelineAnswer): void {
  const from = Date.parse(answer.from)
  const minutes = answer.gpus[0]?.busy.length ?? 0
  const empty = answer.gpus.length === 0
  find(document, '#usage-gpus .chart').hidden = empty
  if (empty) {
    chart.clear()
    note('usage-gpus', 'No GPUs in the inventory.')
    return
  }
  chart.show({
    x: Array.from({ length: minutes }, (_, i) => from / 1000 + i * answer.bucketSeconds),
    stepSeconds: answer.bucketSeconds,
    rows: answer.gpus.map((g) => ({ label: g.name, values: g.busy }))
  })
  const since = answer.observedSince == null ? NaN : Date.parse(answer.observedSince)
  note('usage-gpus', since > from ? `Read since ${minuteWords(since / 1000)} (this gateway started then): the minutes before are unknown.` : '')
  const busiest = answer.gpus.map((g) => ({ name: g.name, mean: meanOf(g.busy) ?? 0 })).sort((a, b) => b.mean - a.mean)[0]
  setText(find(document, '#usage-gpus .chart-summary'), busiest.mean > 0 ? `busiest: ${busiest.name}, ${Math.round(busiest.mean * 100)}% of the hour` : 'every GPU idle this hour')
}

function budgetBar (label: string, used: number | undefined, limit: number | null | undefined): HTMLElement | null {
  if (limit == null || limit <= 0) return null
  const spent = used ?? 0
  const share = spent / limit
  const fill = el('div', { class: 'meter-fill' })
  fill.style.width = `${Math.min(100, share * 100).toFixed(1)}%`
  return el('div', { class: `budget-window${share >= 1 ? ' over' : share >= 0.8 ? ' near' : ''}`, 'data-window': label }, [
    el('div', { class: 'budget-words' }, [
      el('span', { text: label }),
      el('span', { class: 'budget-used num', text: `${exact(spent)} of ${exact(limit)} (${Math.round(share * 100)}%)` })
    ]),
    el('div', { class: 'meter', role: 'meter', 'aria-valuemin': '0', 'aria-valuemax': String(limit), 'aria-valuenow': String(spent), 'aria-label': `${label}: tokens used` }, [fill])
  ])
}

function showBudgets (keys: KeyRow[]): void {
  const budgeted = keys.filter((k) => k.revokedAt == null && ((k.tokensPerDay ?? 0) > 0 || (k.tokensPerMonth ?? 0) > 0))
    .sort((a, b) => a.name.localeCompare(b.name, undefined, { numeric: true }))
  keyed(find(document, '#usage-budgets .budgets'), budgeted, (k) => k.name, () => el('div', { class: 'budget' }), (node, k) => {
    setAttr(node, 'data-budget', k.name)
    node.replaceChildren(el('div', { class: 'budget-name', text: k.name }),
      ...[budgetBar('today', k.usedToday, k.tokensPerDay), budgetBar('this month', k.usedThisMonth, k.tokensPerMonth)].filter((b): b is HTMLElement => b != null))
  })
  const active = keys.filter((k) => k.revokedAt == null).length
  note('usage-budgets', budgeted.length > 0
    ? active > budgeted.length ? `${active - budgeted.length} more ${active - budgeted.length === 1 ? 'key has' : 'keys have'} no token budget.` : ''
    : active > 0 ? 'No key has a token budget (tokensPerDay, tokensPerMonth).' : 'No API keys.')
}

/** Reads everything the view shows, once (a refresh while one runs waits for it). */
async function refresh (): Promise<void> {
  if (loading != null) return await loading
  loading = (async () => {
    if (charts == null) return
    const hours = WINDOWS[windowName].hours
    const now = Date.now()
    const from = now - (now % HOUR_MS) - (hours - 1) * HOUR_MS
    const range = `from=${new Date(from).toISOString()}&to=${new Date(from + hours * HOUR_MS).toISOString()}`
    const [byClient, byModel, timeline, keys] = await Promise.allSettled([
      read<{ rows: UsageRow[] }>(`usage?${range}&groupBy=hour,client`),
      read<{ rows: UsageRow[] }>(`usage?${range}&groupBy=hour,model`),
      read<TimelineAnswer>('gpu-timeline'),
      read<KeyRow[] | { keys: KeyRow[] }>('api-keys')
    ])
    if (byClient.status === 'fulfilled') showTokens('usage-clients', charts.client, tokensPerHour(byClient.value.rows, 'client', from, hours))
    else failed('usage-clients', byClient.reason)
    if (byModel.status === 'fulfilled') showTokens('usage-models', charts.model, tokensPerHour(byModel.value.rows, 'model', from, hours))
    else failed('usage-models', byModel.reason)
    if (timeline.status === 'fulfilled') showTimeline(charts.gpus, timeline.value)
    else failed('usage-gpus', timeline.reason)
    if (keys.status === 'fulfilled') showBudgets(Array.isArray(keys.value) ? keys.value : keys.value.keys ?? [])
    else failed('usage-budgets', keys.reason)
    const view = find(document, '#usage')
    setAttr(view, 'data-refreshed', String(Date.now()))
    setText(find(view, '.usage-refreshed'), `updated ${new Date().toLocaleTimeString()}`)
  })().finally(() => { loading = undefined })
  return await loading
}

function chooseWindow (name: WindowName): void {
  windowName = name
  for (const b of Array.from(document.querySelectorAll<HTMLElement>('#usage [data-window-choice]'))) {
    setAttr(b, 'aria-pressed', String(b.dataset.windowChoice === name))
  }
  for (const t of Array.from(document.querySelectorAll('#usage .window-words'))) setText(t, WINDOWS[name].words)
  void refresh()
}

/** Shows the fleet or the usage (the header's tabs; `#usage` in the address opens the usage). */
function showView (view: 'fleet' | 'usage'): void {
  find(document, '#usage').hidden = view !== 'usage'
  find(document, 'main.layout').hidden = view !== 'fleet'
  for (const tab of Array.from(document.querySelectorAll<HTMLElement>('.views [data-view]'))) {
    setAttr(tab, 'aria-selected', String(tab.dataset.view === view))
  }
  window.clearInterval(timer)
  timer = undefined
  if (view !== 'usage') return
  charts ??= {
    client: new StackedBars(find(document, '#usage-clients .chart'), { height: 260, format: exact, short, step: hourWords }),
    model: new StackedBars(find(document, '#usage-models .chart'), { height: 260, format: exact, short, step: hourWords }),
    gpus: new Timeline(find(document, '#usage-gpus .chart'), { step: minuteWords })
  }
  void refresh()
  timer = window.setInterval(() => { void refresh() }, REFRESH_MS)
}

export function startUsage (): void {
  for (const tab of Array.from(document.querySelectorAll<HTMLElement>('.views [data-view]'))) {
    tab.addEventListener('click', () => {
      const view = tab.dataset.view === 'usage' ? 'usage' : 'fleet'
      history.replaceState(null, '', view === 'usage' ? '#usage' : location.pathname + location.search)
      showView(view)
    })
  }
  for (const b of Array.from(document.querySelectorAll<HTMLElement>('#usage [data-window-choice]'))) {
    b.addEventListener('click', () => { chooseWindow(b.dataset.windowChoice === 'month' ? 'month' : 'day') })
  }
  window.addEventListener('hashchange', () => { showView(location.hash === '#usage' ? 'usage' : 'fleet') })
  showView(location.hash === '#usage' ? 'usage' : 'fleet')
}
