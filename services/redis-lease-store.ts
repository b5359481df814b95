import { randomUUID } from 'node:crypto'
import type { Cluster, Redis } from 'ioredis'
import type {
  AttemptInput, AttemptResult, Candidate, Grant, HeldLease, LeaseInfo, LeaseStore, LeaseStoreOptions, StoreEvents,
  StoreStatus
} from './lease-store.js'
import { assertSafeIds } from './lease-store.js'

/*
 * Every script runs atomically on one Redis and gets the same leading ARGV:
 *   1 key prefix, 2 lease ttl ms, 3 starvation ms, 4 replica id, 5 epoch this replica knows ('' at
 *   boot), 6 a fresh epoch to create if none exists, 7 how long grants pause after a lost epoch.
 * Keys (all under the prefix; queue names are hex, ids are checked against SAFE_ID):
 *   epoch, pause, fence, seq             store generation, grant pause, lease counter, tie-breaker
 *   server          = run_id             the Redis server that last ran a script on this data
 *   replica:<id>                         alive while that replica heart-beats (PX ttl)
 *   gpu:<id>        = token              the lease holding a GPU (PX ttl)
 *   hold:<id>       = member             GPU held back for a starving waiter (PX ttl)
 *   lease:<token>   hash                 gpus, assignment, queue, model, kind, purpose, since (PX ttl)
 *   q:<queue>       zset member→score    arrival order of a model's waiters
 *   w:<member>      hash                 queue, cands, since, model, kind, purpose; token+index once granted
 *   gq:<gpu>        set of queues        queues with waiters that could use a GPU (serve on release)
 *   queues          set of queues        for status
 * Channel `events`: `g|member|token|index` for a grant to another replica's waiter, `i` for an
 * inventory change. Every script that grants returns its grants in its reply, and the store hands
 * those of its own replica's waiters on at once: no pub/sub hop between a release and the next
 * request on the freed GPUs.
 */
const PRELUDE = `
local P = ARGV[1]
local TTL = tonumber(ARGV[2])
local STARVE = tonumber(ARGV[3])
local REPLICA = ARGV[4]
local t = redis.call('TIME')
local NOW = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local GRANTS = {}
local PAUSED = false

local function split (s, sep)
  local out = {}
  if not s then return out end
  for piece in string.gmatch(s, '([^' .. sep .. ']+)') do out[#out + 1] = piece end
  return out
end

local function alive (m)
  local r = string.match(m, '^([^|]+)|')
  if not r then return false end
  if r == REPLICA then return true end
  return redis.call('EXISTS', P .. 'replica:' .. r) == 1
end

local function epoch_check ()
  local e = redis.call('GET', P .. 'epoch')
  -- Another server than the one that wrote this data (a Sentinel failover, a restart from a
  -- snapshot): asynchronous replication may have lost the last grants, so pause as for data loss.
  local server = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)')
  local wrote = redis.call('GET', P .. 'server')
  if wrote ~= server then
    redis.call('SET', P .. 'server', server)
    if wrote and e then redis.call('SET', P .. 'pause', '1', 'PX', tonumber(ARGV[7])) end
  end
  if not e then
    e = ARGV[6]
    redis.call('SET', P .. 'epoch', e)
    -- A replica that knew an epoch sees the store lost its data: hold grants for one ttl. By
    -- then every lease that existed has been re-asserted by its holder's renewal, or its holder,
    -- unable to renew it, has stopped its request (LeaseManager stops what it could not renew
    -- for ttl/2, checking every ttl/3, so within 5/6 of a ttl).
    if ARGV[5] ~= '' then redis.call('SET', P .. 'pause', '1', 'PX', tonumber(ARGV[7])) end
  end
  redis.call('SET', P .. 'replica:' .. REPLICA, '1', 'PX', TTL)
  PAUSED = redis.call('EXISTS', P .. 'pause') == 1
  return e
end

local function parse_cands (s)
  local out = {}
  for _, c in ipairs(split(s, ';')) do
    local aid, gs = string.match(c, '^([^=]+)=(.*)$')
    out[#out + 1] = { aid, split(gs, ',') }
  end
  return out
end

local function hold_valid (holder)
  if not alive(holder) then return false end
  local w = redis.call('HMGET', P .. 'w:' .. holder, 'queue', 'token')
  return w[1] ~= false and w[2] == false
end

local function drop_waiter (q, m)
  redis.call('ZREM', P .. 'q:' .. q, m)
  redis.call('DEL', P .. 'w:' .. m)
end

local function head_of (q)
  while true do
    local r = redis.call('ZRANGE', P .. 'q:' .. q, 0, 0, 'WITHSCORES')
    if #r == 0 then return nil end
    local m = r[1]
    if alive(m) and redis.call('EXISTS', P .. 'w:' .. m) == 1 then return m, tonumber(r[2]) end
    drop_waiter(q, m)
  end
end

-- The first candidate whose GPUs are all free and held back for no other live waiter (stale
-- holds are dropped on the way), or nil.
local function free_candidate (m, cands)
  for i, c in ipairs(cands) do
    local ok = true
    for _, g in ipairs(c[2]) do
      if redis.call('EXISTS', P .. 'gpu:' .. g) == 1 then ok = false break end
      local h = redis.call('GET', P .. 'hold:' .. g)
      if h and h ~= m then
        if hold_valid(h) then ok = false break end
        redis.call('DEL', P .. 'hold:' .. g)
      end
    end
    if ok then return i end
  end
  return nil
end

-- Lease every GPU of candidate c to member m; returns the token.
local function take (m, q, c, model, kind, purpose)
  local fence = redis.call('INCR', P .. 'fence')
  local token = m .. '#' .. fence
  for _, g in ipairs(c[2]) do
    redis.call('SET', P .. 'gpu:' .. g, token, 'PX', TTL)
    if redis.call('GET', P .. 'hold:' .. g) == m then redis.call('DEL', P .. 'hold:' .. g) end
  end
  local lkey = P .. 'lease:' .. token
  redis.call('HSET', lkey, 'gpus', table.concat(c[2], ','), 'assignment', c[1], 'queue', q,
    'model', model, 'kind', kind, 'purpose', purpose, 'since', NOW)
  redis.call('PEXPIRE', lkey, TTL)
  return token
end

local function try_grant (q, m)
  local w = redis.call('HMGET', P .. 'w:' .. m, 'cands', 'since', 'model', 'kind', 'purpose')
  local cands = parse_cands(w[1])
  local i = free_candidate(m, cands)
  if i then
    local token = take(m, q, cands[i], w[3], w[4], w[5])
    redis.call('ZREM', P .. 'q:' .. q, m)
    redis.call('HSET', P .. 'w:' .. m, 'token', token, 'index', i - 1)
    redis.call('PEXPIRE', P .. 'w:' .. m, TTL)
    return token, i - 1
  end
  -- Starving: hold back the first candidate whose GPUs no other waiter holds, so the GPUs
  -- stay free for this waiter as they are released.
  if NOW - tonumber(w[2]) >= STARVE then
    for _, c in ipairs(cands) do
      local free = true
      for _, g in ipairs(c[2]) do
        local h = redis.call('GET', P .. 'hold:' .. g)
        if h and h ~= m and hold_valid(h) then free = false break end
      end
      if free then
        for _, g in ipairs(c[2]) do redis.call('SET', P .. 'hold:' .. g, m, 'PX', TTL) end
        break
      end
    end
  end
  return nil
end

-- Grant to queue heads, oldest arrival first across the queues, until no head can be served.
local function serve (queues)
  if PAUSED then return end
  local heads = {}
  for _, q in ipairs(queues) do
    if heads[q] == nil then
      local m, s = head_of(q)
      if m then heads[q] = { m, s } end
    end
  end
  while true do
    local bq, best = nil, nil
    for q, h in pairs(heads) do
      if best == nil or h[2] < best[2] then bq, best = q, h end
    end
    if bq == nil then break end
    local token, idx = try_grant(bq, best[1])
    if token then
      GRANTS[#GRANTS + 1] = best[1]
      GRANTS[#GRANTS + 1] = token
      GRANTS[#GRANTS + 1] = idx
      -- The calling replica reads its own waiters' grants from the reply; only the others are told.
      if string.sub(best[1], 1, #REPLICA + 1) ~= REPLICA .. '|' then
        redis.call('PUBLISH', P .. 'events', 'g|' .. best[1] .. '|' .. token .. '|' .. idx)
      end
      local m, s = head_of(bq)
      if m then heads[bq] = { m, s } else heads[bq] = nil end
    else
      heads[bq] = nil
    end
  end
end

local function release_token (token, gpulist)
  local lkey = P .. 'lease:' .. token
  local gpus = split(redis.call('HGET', lkey, 'gpus') or gpulist, ',')
  local n = 0
  for _, g in ipairs(gpus) do
    if redis.call('GET', P .. 'gpu:' .. g) == token then
      redis.call('DEL', P .. 'gpu:' .. g)
      n = n + 1
    end
  end
  redis.call('DEL', lkey)
  if n > 0 then
    local qs, seen = {}, {}
    for _, g in ipairs(gpus) do
      for _, q in ipairs(redis.call('SMEMBERS', P .. 'gq:' .. g)) do
        if redis.call('EXISTS', P .. 'q:' .. q) == 0 then
          redis.call('SREM', P .. 'gq:' .. g, q)
        elseif not seen[q] then
          seen[q] = true
          qs[#qs + 1] = q
        end
      end
    end
    serve(qs)
  end
  return n
end
`

// ARGV 8 member, 9 queue, 10 candidates, 11 model, 12 kind, 13 purpose, 14 queue max, 15 score or ''
const ATTEMPT = PRELUDE + `
local e = epoch_check()
local m, q = ARGV[8], ARGV[9]
local wkey = P .. 'w:' .. m
local qkey = P .. 'q:' .. q
local function granted ()
  local w = redis.call('HMGET', wkey, 'token', 'index')
  if w[1] then
    redis.call('DEL', wkey)
    return { 'granted', e, w[1], tostring(w[2]), unpack(GRANTS) }
  end
  return nil
end
local done = granted()
if done then return done end
local score = redis.call('ZSCORE', qkey, m)
local tried = false
if not score and not PAUSED and ARGV[15] == '' and redis.call('EXISTS', qkey) == 0 then
  -- Nobody waits for this model: a free candidate is taken at once, with no queue entry to write
  -- and remove; this is what serving the queue would do with this member as its only waiter.
  local cands = parse_cands(ARGV[10])
  local i = free_candidate(m, cands)
  if i then return { 'granted', e, take(m, q, cands[i], ARGV[11], ARGV[12], ARGV[13]), tostring(i - 1) } end
  tried = true
end
if not score then
  if redis.call('ZCARD', qkey) >= tonumber(ARGV[14]) then
    head_of(q)
    if redis.call('ZCARD', qkey) >= tonumber(ARGV[14]) then return { 'full', e } end
  end
  score = tonumber(ARGV[15])
  if not score then score = NOW * 1024 + (redis.call('INCR', P .. 'seq') % 1024) end
  redis.call('ZADD', qkey, score, m)
  redis.call('HSET', wkey, 'queue', q, 'cands', ARGV[10], 'since', NOW, 'model', ARGV[11], 'kind', ARGV[12],
    'purpose', ARGV[13])
  for _, c in ipairs(parse_cands(ARGV[10])) do
    for _, g in ipairs(c[2]) do redis.call('SADD', P .. 'gq:' .. g, q) end
  end
  redis.call('SADD', P .. 'queues', q)
end
if PAUSED then return { 'paused', e, string.format('%.0f', tonumber(score)) } end
-- Just found every candidate busy, and a new waiter is not starving yet: serving would change nothing.
if not tried or STARVE <= 0 then serve({ q }) end
done = granted()
if done then return done end
return { 'waiting', e, tostring(redis.call('ZRANK', qkey, m)), string.format('%.0f', tonumber(score)), unpack(GRANTS) }
`

// ARGV 8 number of queues, then the queues, then members: serve, then report its grants and the
// members' grants (a member granted in this call appears twice).
const SWEEP = PRELUDE + `
local e = epoch_check()
local nq = tonumber(ARGV[8])
local qs = {}
for i = 9, 8 + nq do qs[#qs + 1] = ARGV[i] end
serve(qs)
local out = { e, unpack(GRANTS) }
for i = 9 + nq, #ARGV do
  local m = ARGV[i]
  local w = redis.call('HMGET', P .. 'w:' .. m, 'token', 'index')
  if w[1] then
    redis.call('DEL', P .. 'w:' .. m)
    out[#out + 1] = m
    out[#out + 1] = w[1]
    out[#out + 1] = tostring(w[2])
  end
end
return out
`

// ARGV 8 queue, 9 member
const LEAVE = PRELUDE + `
epoch_check()
local q, m = ARGV[8], ARGV[9]
local token = redis.call('HGET', P .. 'w:' .. m, 'token')
drop_waiter(q, m)
if token then release_token(token, nil) end
serve({ q })
return GRANTS
`

// ARGV 8 token, 9 gpus (used when the lease record is gone). Returns { GPUs freed, grants... }
const RELEASE = PRELUDE + `
epoch_check()
local n = release_token(ARGV[8], ARGV[9])
return { n, unpack(GRANTS) }
`

// ARGV 8 gpus: releases the reservations holding them (not leases of requests in flight)
const RELEASE_GPUS = PRELUDE + `
epoch_check()
local n = 0
for _, g in ipairs(split(ARGV[8], ',')) do
  local token = redis.call('GET', P .. 'gpu:' .. g)
  -- A GPU serving a request in flight is that request's until it ends: never freed from outside.
  if token and redis.call('HGET', P .. 'lease:' .. token, 'purpose') ~= 'proxy' then
    n = n + release_token(token, g)
  end
end
return { n, unpack(GRANTS) }
`

// ARGV 8.. groups of 7: token, gpus, assignment, queue, model, kind, purpose. Returns tokens lost.
const RENEW = PRELUDE + `
epoch_check()
local lost = {}
for i = 8, #ARGV, 7 do
  local token = ARGV[i]
  local mine = true
  for _, g in ipairs(split(ARGV[i + 1], ',')) do
    local v = redis.call('GET', P .. 'gpu:' .. g)
    if v == token then
      redis.call('PEXPIRE', P .. 'gpu:' .. g, TTL)
    elseif not v then
      -- The store forgot it (restart, or a pause past the ttl) while the GPU is still working for us.
      redis.call('SET', P .. 'gpu:' .. g, token, 'PX', TTL)
    else
      mine = false
    end
  end
  local lkey = P .. 'lease:' .. token
  if mine then
    if redis.call('PEXPIRE', lkey, TTL) == 0 then
      redis.call('HSET', lkey, 'gpus', ARGV[i + 1], 'assignment', ARGV[i + 2], 'queue', ARGV[i + 3],
        'model', ARGV[i + 4], 'kind', ARGV[i + 5], 'purpose', ARGV[i + 6], 'since', NOW)
      redis.call('PEXPIRE', lkey, TTL)
    end
  else
    lost[#lost + 1] = token
  end
end
return lost
`

// ARGV 8 token: renew only if the lease still exists; answers its record.
const PING = PRELUDE + `
epoch_check()
local token = ARGV[8]
local lkey = P .. 'lease:' .. token
local l = redis.call('HMGET', lkey, 'gpus', 'assignment', 'queue', 'model', 'kind', 'purpose')
if not l[1] then return nil end
for _, g in ipairs(split(l[1], ',')) do
  if redis.call('GET', P .. 'gpu:' .. g) ~= token then return nil end
end
for _, g in ipairs(split(l[1], ',')) do redis.call('PEXPIRE', P .. 'gpu:' .. g, TTL) end
redis.call('PEXPIRE', lkey, TTL)
return l
`

// ARGV 8 gpus. Returns { gpu rows..., '--', queue depths..., '--', holds... }
const STATUS = PRELUDE + `
local out = {}
local gpus = split(ARGV[8], ',')
for _, g in ipairs(gpus) do
  local token = redis.call('GET', P .. 'gpu:' .. g)
  if token then
    local l = redis.call('HMGET', P .. 'lease:' .. token, 'assignment', 'model', 'purpose', 'since')
    out[#out + 1] = g
    out[#out + 1] = token
    out[#out + 1] = l[1] or ''
    out[#out + 1] = l[2] or ''
    out[#out + 1] = l[3] or ''
    out[#out + 1] = l[4] or ''
    out[#out + 1] = tostring(redis.call('PTTL', P .. 'gpu:' .. g))
  end
end
out[#out + 1] = '--'
for _, q in ipairs(redis.call('SMEMBERS', P .. 'queues')) do
  local qkey = P .. 'q:' .. q
  for _, m in ipairs(redis.call('ZRANGE', qkey, 0, -1)) do
    if not alive(m) then drop_waiter(q, m) end
  end
  local n = redis.call('ZCARD', qkey)
  if n == 0 then
    redis.call('SREM', P .. 'queues', q)
  else
    out[#out + 1] = q
    out[#out + 1] = tostring(n)
  end
end
out[#out + 1] = '--'
for _, g in ipairs(gpus) do
  local h = redis.call('GET', P .. 'hold:' .. g)
  if h and hold_valid(h) then
    out[#out + 1] = g
    out[#out + 1] = h
  end
end
return out
`

const SCRIPTS = {
  maestroAttempt: ATTEMPT,
  maestroSweep: SWEEP,
  maestroLeave: LEAVE,
  maestroRelease: RELEASE,
  maestroReleaseGpus: RELEASE_GPUS,
  maestroRenew: RENEW,
  maestroPing: PING,
  maestroStatus: STATUS
} as const

type ScriptName = keyof typeof SCRIPTS
type ScriptClient = (Redis | Cluster) & Record<ScriptName, (...args: Array<string | number>) => Promise<any>>

export interface RedisLeaseStoreOptions extends LeaseStoreOptions {
  /** Commands; made to fail fast while disconnected so no request waits on a dead store. */
  client: Redis | Cluster
  /** A second connection for pub/sub (a subscribed connection can run nothing else). */
  subscriber: Redis | Cluster
  prefix: string
  replicaId?: string
}

function encodeCandidates (candidates: Candidate[]): string {
  return candidates.map((c) => `${c.assignmentId}=${c.gpuIds.join(',')}`).join(';')
}

function parseGrants (flat: unknown[], from: number): Grant[] {
  const grants: Grant[] = []
  for (let i = from; i + 2 < flat.length; i += 3) {
    grants.push({ member: String(flat[i]), token: String(flat[i + 1]), candidateIndex: Number(flat[i + 2]) })
  }
  return grants
}

export class RedisLeaseStore implements LeaseStore {
  readonly kind = 'redis' as const
  readonly replicaId: string
  private readonly client: ScriptClient
  private readonly subscriber: Redis | Cluster
  private readonly prefix: string
  private readonly opts: LeaseStoreOptions
  private knownEpoch = ''
  private events?: StoreEvents
  private wasReady = false

  constructor (opts: RedisLeaseStoreOptions) {
    this.client = opts.client as ScriptClient
    this.subscriber = opts.subscriber
    this.prefix = opts.prefix
    this.opts = { ttlMs: opts.ttlMs, queueMax: opts.queueMax, starvationMs: opts.starvationMs }
    this.replicaId = opts.replicaId ?? randomUUID().slice(0, 12)
    for (const [name, lua] of Object.entries(SCRIPTS)) {
      if (typeof (this.client as any)[name] !== 'function') {
        // KEYS[1] (the epoch key) routes each script to the node holding the prefix's slot on a Cluster.
        this.client.defineCommand(name, { numberOfKeys: 1, lua })
      }
    }
  }

  private get channel (): string {
    return this.prefix + 'events'
  }

  async start (events: StoreEvents): Promise<void> {
    this.events = events
    this.subscriber.on('message', (channel: string, message: string) => {
      if (channel !== this.channel) return
      if (message === 'i') {
        events.onInventoryChanged()
        return
      }
      // `g|<replica>|<n>|<replica>|<n>#<fence>|<index>`: member and token both contain a `|`
      const parts = message.split('|')
      if (parts[0] === 'g' && parts[1] === this.replicaId && parts.length === 6) {
        events.onGrant({
          member: `${parts[1]}|${parts[2]}`, token: `${parts[3]}|${parts[4]}`, candidateIndex: Number(parts[5])
        })
      }
    })
    this.client.on('ready', () => {
      // ioredis resends nothing for us after a reconnect: let the manager re-assert its state.
      if (this.wasReady) events.onReconnect()
      this.wasReady = true
    })
    if (this.client.status === 'ready') this.wasReady = true
    await this.subscriber.subscribe(this.channel)
    await this.sweep([], [])
  }

  private args (): Array<string | number> {
    return [
      this.prefix + 'epoch', this.prefix, this.opts.ttlMs, this.opts.starvationMs, this.replicaId, this.knownEpoch,
      randomUUID(), this.opts.ttlMs
    ]
  }

  private noteEpoch (epoch: string): void {
    if (this.knownEpoch !== '' && epoch !== this.knownEpoch) {
      this.knownEpoch = epoch
      this.events?.onReconnect()
      return
    }
    this.knownEpoch = epoch
  }

  async attempt (input: AttemptInput): Promise<AttemptResult> {
    assertSafeIds(input.candidates)
    const r: unknown[] = await this.client.maestroAttempt(
      ...this.args(), input.member, input.queue, encodeCandidates(input.candidates), input.info.model,
      input.info.kind, input.info.purpose, this.opts.queueMax, input.score ?? '')
    const status = String(r[0])
    const epoch = String(r[1])
    this.noteEpoch(epoch)
    switch (status) {
      case 'granted':
        return { status, epoch, token: String(r[2]), candidateIndex: Number(r[3]), grants: parseGrants(r, 4) }
      case 'waiting':
        return { status, epoch, position: Number(r[2]), score: Number(r[3]), grants: parseGrants(r, 4) }
      case 'paused':
        return { status, epoch, score: Number(r[2]), grants: [] }
      default:
        return { status: 'full', epoch, grants: [] }
    }
  }

  async sweep (queues: string[], members: string[]): Promise<Grant[]> {
    const r: unknown[] = await this.client.maestroSweep(...this.args(), queues.length, ...queues, ...members)
    this.noteEpoch(String(r[0]))
    return parseGrants(r, 1)
  }

  /** Hand this replica's grants from a script's reply on, as pub/sub would for another replica's. */
  private deliver (grants: Grant[]): void {
    const own = this.replicaId + '|'
    for (const g of grants) {
      if (g.member.startsWith(own)) this.events?.onGrant(g)
    }
  }

  async leave (queue: string, member: string): Promise<void> {
    const r: unknown[] = await this.client.maestroLeave(...this.args(), queue, member)
    this.deliver(parseGrants(r, 0))
  }

  async release (token: string, gpuIds: string[] = []): Promise<boolean> {
    const r: unknown[] = await this.client.maestroRelease(...this.args(), token, gpuIds.join(','))
    this.deliver(parseGrants(r, 1))
    return Number(r[0]) > 0
  }

  async releaseGpus (gpuIds: string[]): Promise<number> {
    assertSafeIds([{ assignmentId: 'x', gpuIds }])
    const r: unknown[] = await this.client.maestroReleaseGpus(...this.args(), gpuIds.join(','))
    this.deliver(parseGrants(r, 1))
    return Number(r[0])
  }

  async renew (leases: HeldLease[]): Promise<string[]> {
    if (leases.length === 0) {
      await this.sweep([], [])
      return []
    }
    const flat: string[] = []
    for (const l of leases) {
      flat.push(l.token, l.gpuIds.join(','), l.assignmentId, l.queue, l.info.model, l.info.kind, l.info.purpose)
    }
    const lost: unknown[] = await this.client.maestroRenew(...this.args(), ...flat)
    return lost.map(String)
  }

  async ping (token: string): Promise<HeldLease | undefined> {
    const l: Array<string | null> | null = await this.client.maestroPing(...this.args(), token)
    if (l == null) return undefined
    const info: LeaseInfo = { model: l[3] ?? '', kind: l[4] ?? '', purpose: (l[5] as LeaseInfo['purpose']) ?? 'reservation' }
    return { token, gpuIds: (l[0] ?? '').split(',').filter(Boolean), assignmentId: l[1] ?? '', queue: l[2] ?? '', info }
  }

  async tokensOf (gpuIds: string[]): Promise<Array<string | undefined>> {
    if (gpuIds.length === 0) return []
    assertSafeIds([{ assignmentId: 'x', gpuIds }])
    const values = await this.client.mget(...gpuIds.map((g) => this.prefix + 'gpu:' + g))
    return values.map((v) => v ?? undefined)
  }

  async status (gpuIds: string[]): Promise<StoreStatus> {
    const r: string[] = await this.client.maestroStatus(...this.args(), gpuIds.join(','))
    const out: StoreStatus = { gpus: [], queues: {}, holds: {} }
    let i = 0
    const now = Date.now()
    for (; r[i] !== '--'; i += 7) {
      const ttl = Number(r[i + 6])
      out.gpus.push({
        gpuId: r[i],
        token: r[i + 1],
        assignmentId: r[i + 2] || undefined,
        model: r[i + 3] || undefined,
        purpose: r[i + 4] || undefined,
        since: r[i + 5] !== '' ? Number(r[i + 5]) : undefined,
        expiresAt: ttl >= 0 ? now + ttl : undefined
      })
    }
    for (i++; r[i] !== '--'; i += 2) out.queues[r[i]] = Number(r[i + 1])
    for (i++; i < r.length; i += 2) out.holds[r[i]] = r[i + 1]
    return out
  }

  async publishInventoryChanged (): Promise<void> {
    await this.client.publish(this.channel, 'i')
  }

  available (): boolean {
    return this.client.status === 'ready'
  }

  async close (): Promise<void> {
    this.subscriber.removeAllListeners('message')
  }
}
