import { clock, duration, el, find, keyed, setAttr, setClass, setText } from './dom.js'
import { applyChange, type Assignment, type Computer, type Fleet, type FleetChange, type Gpu, type Queue, type RecentRequest, type Section } from './fleet.js'
import { adminToken, offerAdmin, startAdmin } from './admin.js'
import { openEventStream } from './event-stream.js'
import { startUsage } from './usage.js'
import { refreshSoon, startScheduling, warmthMissing, warmthOf } from './scheduling.js'

/*
 * The operator console: one event stream on `../gpu/events` (relative, so the page works under any
 * prefix) with the token typed in, if any, the fleet kept as snapshot + changes, and every record
 * drawn into its own element, updated in place. Durations are counted here, once a second, so a
 * long lease sends nothing. Without the admin token the feed has no addresses and no requests
 * (or a key's own only): those cells stay empty.
 */

const STATE_WORDS: Record<Gpu['state'], string> = { idle: 'idle', leased: 'leased', held: 'held for a waiter' }
const HEALTH_WORDS: Record<string, string> = { up: 'up', cooling: 'cooling down', unreachable: 'unreachable', unknown: 'unknown' }

let fleet: Fleet | undefined

const byName = <T extends { name: string }>(a: T, b: T): number => a.name.localeCompare(b.name, undefined, { numeric: true })

function gpuDetail (gpu: Gpu): string {
  if (gpu.state === 'held') return 'kept free for a request that has waited long'
  if (gpu.state !== 'leased') return `${gpu.vramGb} GB`
  const parts = [gpu.model ?? '?']
  if (gpu.assignment != null) parts.push(`on ${gpu.assignment}`)
  if (gpu.purpose === 'reservation') parts.push('reserved')
  return parts.join(' · ')
}

function renderComputers (root: HTMLElement, f: Fleet): void {
  const gpus = new Map(f.gpus.map((g) => [g.id, g]))
  keyed(root, [...f.computers].sort(byName), (c) => c.id, (c) => el('article', { class: 'computer' }, [
    el('header', {}, [el('h3', { class: 'computer-name' }), el('span', { class: 'computer-ip' })]),
    el('ul', { class: 'gpus' })
  ]), (node, c: Computer) => {
    setText(find(node, '.computer-name'), c.name)
    setText(find(node, '.computer-ip'), c.ip ?? '')
    const list = c.gpuIds.map((id) => gpus.get(id)).filter((g): g is Gpu => g != null)
    keyed(find(node, '.gpus'), list, (g) => g.id, () => el('li', { class: 'gpu' }, [
      el('div', { class: 'gpu-head' }, [el('span', { class: 'gpu-name' }), el('span', { class: 'gpu-state' })]),
      el('div', { class: 'gpu-detail' }),
      el('div', { class: 'gpu-meta' }, [el('span', { class: 'gpu-since' }), el('span', { class: 'gpu-slots' })])
    ]), (li, g: Gpu) => {
      setClass(li, `gpu state-${g.state}`)
      setAttr(li, 'data-gpu', g.id)
      setText(find(li, '.gpu-name'), g.name)
      setText(find(li, '.gpu-state'), STATE_WORDS[g.state])
      setText(find(li, '.gpu-detail'), gpuDetail(g))
      const since = find(li, '.gpu-since')
      setAttr(since, 'data-since', g.state === 'leased' && g.since != null ? String(g.since) : undefined)
      if (g.state !== 'leased') setText(since, '')
      setText(find(li, '.gpu-slots'), g.state === 'leased' && g.slots != null ? `slots ${g.slots.used}/${g.slots.capacity}` : '')
    })
  })
  setText(find(document, '#gpu-count'), `${f.gpus.filter((g) => g.state === 'leased').length} of ${f.gpus.length} GPUs leased`)
}

function renderQueues (root: HTMLElement, f: Fleet): void {
  const queues = [...f.queues].sort((a, b) => b.depth - a.depth || a.id.localeCompare(b.id))
  keyed(root, queues, (q) => q.id, () => el('tr', {}, [
    el('td', { class: 'queue-model', 'data-label': 'Model' }), el('td', { class: 'queue-kind', 'data-label': 'Kind' }), el('td', { class: 'queue-depth num', 'data-label': 'Waiting' }), el('td', { class: 'queue-oldest num', 'data-label': 'Oldest' })
  ]), (tr, q: Queue) => {
    setText(find(tr, '.queue-model'), q.model)
    setText(find(tr, '.queue-kind'), q.kind)
    setText(find(tr, '.queue-depth'), String(q.depth))
    const oldest = find(tr, '.queue-oldest')
    setAttr(oldest, 'data-since', q.oldestSince != null ? String(q.oldestSince) : undefined)
    if (q.oldestSince == null) setText(oldest, '—')
  })
  find(document, '#queues-empty').hidden = queues.length > 0
}

function healthOf (a: Assignment): string {
  if (a.drained === true) return 'drained'
  return a.health ?? 'unknown'
}

function renderAssignments (root: HTMLElement, f: Fleet): void {
  const gpuNames = new Map(f.gpus.map((g) => [g.id, g.name]))
  keyed(root, [...f.assignments].sort(byName), (a) => a.id, () => el('tr', {}, [
    el('td', { class: 'a-name', 'data-label': 'Name' }), el('td', { class: 'a-model', 'data-label': 'Model' }), el('td', { class: 'a-where', 'data-label': 'Address' }), el('td', { class: 'a-gpus', 'data-label': 'GPUs' }),
    el('td', { class: 'a-slots num', 'data-label': 'Slots' }), el('td', { 'data-label': 'Upstream' }, [el('span', { class: 'a-health pill' })]), el('td', { class: 'a-loaded', 'data-label': 'Loaded' }),
    el('td', { class: 'a-conversations num', 'data-label': 'Conversations' }), el('td', { class: 'a-hits num', 'data-label': 'Affinity hits' })
  ]), (tr, a: Assignment) => {
    setText(find(tr, '.a-name'), a.name)
    setText(find(tr, '.a-model'), a.model)
    setText(find(tr, '.a-where'), a.address ?? '—')
    setText(find(tr, '.a-gpus'), a.gpuIds.map((id) => gpuNames.get(id) ?? id).join(', '))
    setText(find(tr, '.a-slots'), `${a.slots.used}/${a.slots.capacity}`)
    setClass(tr, a.slots.used > 0 ? 'busy' : '')
    const health = find(tr, '.a-health')
    const word = healthOf(a)
    setClass(health, `a-health pill health-${word}`)
    setText(health, word === 'drained' ? 'drained' : HEALTH_WORDS[word] ?? word)
    setText(find(tr, '.a-loaded'), a.loaded == null ? '—' : a.loaded.length === 0 ? 'none' : a.loaded.join(', '))
    renderWarmth(tr, a)
  })
}

/** What the server holds warm for scheduler v3 (ui/scheduling.ts): conversations cached there, its affinity hit rate. */
function renderWarmth (tr: HTMLElement, a: Assignment): void {
  const cells = [find(tr, '.a-conversations'), find(tr, '.a-hits')]
  if (a.kind !== 'llm') {
    for (const cell of cells) { setText(cell, ''); setAttr(cell, 'title', undefined) }
    return
  }
  const w = warmthOf(a.id)
  if (w === undefined) {
    for (const cell of cells) { setText(cell, '—'); setAttr(cell, 'title', warmthMissing()) }
    return
  }
  setText(cells[0], String(w.conversations))
  setAttr(cells[0], 'title', 'conversations whose last turn it served: the affinity map sends their next turn here')
  setText(cells[1], w.hitRate === null ? '—' : `${Math.round(w.hitRate * 100)} %`)
  setAttr(cells[1], 'title', `${w.hits} of ${w.requests} requests with a prompt fingerprint were sent here by the affinity map`)
}

function renderReplicas (f: Fleet): void {
  const root = find(document, '#replicas')
  keyed(root, f.replicas, (r) => r.id, () => el('li', { class: 'replica' }), (li, r) => {
    setText(li, r.host != null ? `${r.host} · ${r.id.slice(0, 6)}` : r.id)
    setAttr(li, 'title', `replica ${r.id}${r.pid != null ? `, process ${r.pid}` : ''}${r.id === f.replica ? ' (serving this page)' : ''}`)
    setClass(li, r.id === f.replica ? 'replica self' : 'replica')
  })
  setText(find(document, '#replica-count'), `${f.replicas.length} ${f.replicas.length === 1 ? 'replica' : 'replicas'} alive`)
}

const ms = (v: number | undefined): string => v == null ? '—' : v < 1000 ? `${Math.round(v)} ms` : `${(v / 1000).toFixed(1)} s`

function renderRecent (root: HTMLElement, f: Fleet): void {
  // newest first; two requests can share a time, so the key is the time and the position among equals
  const seen = new Map<string, number>()
  const recent = f.recent ?? []
  const rows = recent.map((r) => {
    const base = `${r.at}|${r.model}|${r.status}|${r.client ?? ''}`
    const n = seen.get(base) ?? 0
    seen.set(base, n + 1)
    return { r, key: `${base}|${n}` }
  })
  keyed(root, rows, (row) => row.key, () => el('tr', {}, [
    el('td', { class: 'r-time', 'data-label': 'Time' }), el('td', { class: 'r-route', 'data-label': 'Route' }), el('td', { class: 'r-model', 'data-label': 'Model' }), el('td', { class: 'r-client', 'data-label': 'Client' }), el('td', { 'data-label': 'Status' }, [el('span', { class: 'r-status pill' })]),
    el('td', { class: 'r-queue num', 'data-label': 'Queue' }), el('td', { class: 'r-upstream num', 'data-label': 'Upstream' })
  ]), (tr, { r }: { r: RecentRequest }) => {
    setText(find(tr, '.r-time'), clock(r.at))
    setText(find(tr, '.r-model'), r.model)
    setText(find(tr, '.r-route'), r.route ?? '')
    setAttr(find(tr, '.r-model'), 'title', r.assignment != null ? `served by ${r.assignment}` : undefined)
    setText(find(tr, '.r-client'), r.client ?? '—')
    const status = find(tr, '.r-status')
    setText(status, String(r.status))
    setClass(status, `r-status pill status-${r.status >= 500 ? 'error' : r.status >= 400 ? 'refused' : 'ok'}`)
    setText(find(tr, '.r-queue'), ms(r.queueMs))
    setText(find(tr, '.r-upstream'), ms(r.upstreamMs))
  })
  const empty = find(document, '#recent-empty')
  setText(empty, f.recent == null ? 'Shown with an API key (its own) or the admin token.' : 'No requests yet.')
  empty.hidden = recent.length > 0
}

function render (f: Fleet, touched?: Set<Section | 'recent'>): void {
  const all = touched == null
  if (all || touched.has('computers') || touched.has('gpus')) renderComputers(find(document, '#computers'), f)
  if (all || touched.has('queues')) renderQueues(find(document, '#queue-rows'), f)
  if (all || touched.has('assignments') || touched.has('gpus')) renderAssignments(find(document, '#assignment-rows'), f)
  // a server's slots changed: what it holds warm may have too
  if (!all && touched.has('assignments')) refreshSoon()
  if (all || touched.has('replicas')) renderReplicas(f)
  if (all || touched.has('recent')) renderRecent(find(document, '#recent-rows'), f)
  tick()
}

/** Every "since" on the page, counted from the server's clock as of the last event. */
let skewMs = 0
function tick (): void {
  const now = Date.now() - skewMs
  for (const node of Array.from(document.querySelectorAll<HTMLElement>('[data-since]'))) {
    setText(node, duration(now - Number(node.dataset.since)))
  }
}

function setConnection (state: 'live' | 'connecting' | 'unavailable', words: string): void {
  const pill = find(document, '#connection')
  setClass(pill, `pill connection-${state}`)
  setText(pill, words)
}

let stopFeed: (() => void) | undefined

/** (Re)opens the feed with the token of this tab's session: what it shows depends on it. */
function connect (): void {
  stopFeed?.()
  refreshSoon()
  stopFeed = openEventStream('../gpu/events', adminToken(), {
    open: () => { setConnection('live', 'live') },
    error: () => { setConnection('connecting', 'reconnecting…') },
    event: (name, data) => {
      if (name === 'snapshot') {
        fleet = JSON.parse(data) as Fleet
        skewMs = Date.now() - fleet.at
        setConnection('live', 'live')
        document.body.dataset.ready = 'true'
        offerAdmin(fleet.admin)
        render(fleet)
      } else if (name === 'change' && fleet !== undefined) {
        const next = applyChange(fleet, JSON.parse(data) as FleetChange)
        fleet = next.fleet
        render(fleet, next.touched)
      } else if (name === 'unavailable') {
        setConnection('unavailable', 'fleet state unavailable')
      }
    }
  })
}

connect()
setInterval(tick, 1000)
startAdmin(connect)
startUsage()
startScheduling(() => { if (fleet !== undefined) renderAssignments(find(document, '#assignment-rows'), fleet) })
