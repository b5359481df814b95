--[[
  Take a lease for each of a few waiters (those a replica admits in one turn of its event loop: one
  call, one epoch check, one set of definitions for all of them), or queue each in its line and
  serve that line; in the order given, as the same number of calls in a row would.

  KEYS[1]  <prefix>epoch
  ARGV[1..7] see includes/prelude.lua
  Then, per waiter, ATTEMPT_ARGS (19) arguments; those of the first (o = 0) are:
  ARGV[8]  member            ARGV[9]  queue (hex model label)   ARGV[10] candidate list id
  ARGV[11] model             ARGV[12] kind                      ARGV[13] purpose
  ARGV[14] QUEUE_MAX         ARGV[15] QUEUE_MAX_TOTAL
  ARGV[16] score kept from an earlier place in the queue ('' when new)   ARGV[17] its arrival
  ARGV[18] client (hashed)   ARGV[19] level: 0 high, 1 normal, 2 low
  ARGV[20] preferred assignment ids, comma-separated (tried first, never waited for)
  ARGV[21] slots wanted: '1', or 'all' (a reservation takes the whole assignment)
  ARGV[22] the request's cost in the fair order (its estimated tokens; 1 when absent)
  ARGV[23] late binding (includes/late-binding.lua): the assignment holding its prompt's prefix ('' none)
  ARGV[24] how long, ms, it takes only its holder or a server with its model resident ('0': not pinned)
  ARGV[25] how long, ms, after its arrival it may be passed over by later waiters ('0': never)
  ARGV[26] how many candidates the list has (one: whatever its holder, pin or residency, the
           candidate is taken if usable and waited for if not; the plain find does that)

  Returns reply() with body: per waiter in order, how many values follow, then one of
    { 'granted', token, candidate index } | { 'waiting', position, score, arrival }
    | { 'paused', score, arrival } | { 'full', 'queue' | 'total' }
    | { 'list' } when the candidate list is unknown (register it, then try again)
]]
--- @include "includes/prelude"
--- @include "includes/slots"
--- @include "includes/queue"

local ATTEMPT_ARGS = 19

-- One waiter's attempt; its arguments are ARGV[o + 8 .. o + 26]. Returns its answer.
local function attempt (o)
  local m, q, l = ARGV[o + 8], ARGV[o + 9], ARGV[o + 10]
  local want = ARGV[o + 21]
  -- a whole-assignment waiter waits in a line of its own: it must not hold up single slots
  local ln = l .. ':' .. q .. ':' .. want
  local wkey = P .. 'w:' .. m
  local lkey = P .. 'line:' .. ln

  local function granted ()
    local w = redis.call('HMGET', wkey, 'token', 'index')
    if w[1] then
      redis.call('DEL', wkey)
      return { 'granted', w[1], tostring(w[2]) }
    end
    return nil
  end

  local done = granted()
  if done then return done end
  local list_ttl = redis.call('PTTL', P .. 'list:' .. l)
  if list_ttl == -2 then
    serve_freed()
    return { 'list' }
  end
  -- a list in use lives a day from its last use (refreshed twice a day at most: one read otherwise)
  if list_ttl < 43200000 then
    redis.call('PEXPIRE', P .. 'list:' .. l, 86400000)
    redis.call('PEXPIRE', P .. 'lpos:' .. l, 86400000)
    redis.call('PEXPIRE', P .. 'free:' .. l, 86400000)
  end

  local since = tonumber(ARGV[o + 17]) or NOW
  local holder = ARGV[o + 23] or ''
  local pin_ms = tonumber(ARGV[o + 24]) or 0
  local pin_until = pin_ms > 0 and NOW + pin_ms or 0
  local pass_ms = tonumber(ARGV[o + 25]) or 0
  local score = redis.call('ZSCORE', lkey, m)
  if not score and not PAUSED and ARGV[o + 16] == '' and redis.call('EXISTS', lkey) == 0 then
    -- Nobody waits in this line: a free candidate is taken at once, with no queue entry to write.
    local pos, a, n
    if pass_ms > 0 and ARGV[o + 26] ~= '1' then
      pos, a, n = find_new(m, l, q, ARGV[o + 20], want, since, holder, pin_until)
    else
      pos, a, n = find(m, l, ARGV[o + 20], want, nil, since)
    end
    if pos then
      local token = take_at(m, l, pos, a, n, want, q, ARGV[o + 11], ARGV[o + 12], ARGV[o + 13])
      -- served at once, charged all the same (and the line's clock moves on to its start)
      fair_tag(ln, ARGV[o + 18], ARGV[o + 22], true)
      serve_freed()
      return { 'granted', token, tostring(pos) }
    end
  end

  -- Room in a full index (allw, or queue q's qw:): entries not kept alive by their replica's sweep
  -- are gone; then the gone waiters among the first few are dropped.
  local function room (key, max, q)
    if q then expire_queued(q) else redis.call('ZREMRANGEBYSCORE', key, '-inf', NOW) end
    if redis.call('ZCARD', key) < max then return true end
    for _, o in ipairs(redis.call('ZRANGE', key, 0, 7)) do
      if not live(o) then
        drop_waiter(o)
        -- its record may have expired already: drop_waiter then knows no index to leave
        if q then leave_queue(q, o) else redis.call('ZREM', key, o) end
      end
    end
    return redis.call('ZCARD', key) < max
  end

  if not score then
    if not room(P .. 'qw:' .. q, tonumber(ARGV[o + 14]), q) then serve_freed() return { 'full', 'queue' } end
    if not room(P .. 'allw', tonumber(ARGV[o + 15])) then serve_freed() return { 'full', 'total' } end
    local level = tonumber(ARGV[o + 19]) or 1
    score = tonumber(ARGV[o + 16])
    if not score then
      score = level * LEVEL + fair_tag(ln, ARGV[o + 18], ARGV[o + 22])
    end
    redis.call('ZADD', lkey, score, m)
    if level == 1 then redis.call('ZADD', P .. 'age1:' .. ln, since, m) end
    if level == 2 then redis.call('ZADD', P .. 'age2:' .. ln, since, m) end
    redis.call('ZADD', P .. 'qw:' .. q, NOW + LINE_TTL, m)
    redis.call('PEXPIRE', P .. 'qw:' .. q, LINE_TTL)
    -- since: a waiter queued again at its old place keeps its first arrival
    redis.call('ZADD', P .. 'qa:' .. q, since, m)
    redis.call('PEXPIRE', P .. 'qa:' .. q, LINE_TTL)
    redis.call('ZADD', P .. 'allw', NOW + LINE_TTL, m)
    redis.call('ZADD', P .. 'queues', NOW, q)
    redis.call('ZADD', P .. 'lines:' .. l, 'NX', since, ln)
    redis.call('HSET', wkey, 'line', ln, 'list', l, 'queue', q, 'level', level, 'score', score, 'since', since,
      'model', ARGV[o + 11], 'kind', ARGV[o + 12], 'purpose', ARGV[o + 13], 'want', want, 'pref', ARGV[o + 20], 'cost', ARGV[o + 22],
      'holder', holder, 'pin', pin_until, 'pass', pass_ms > 0 and since + pass_ms or '')
    redis.call('PEXPIRE', wkey, LINE_TTL)
    touch_line(ln)
  end
  if PAUSED then return { 'paused', string.format('%.0f', score), tostring(since) } end
  serve_freed()
  -- Every usable candidate of a list is in its free index (find drops only what is not usable, a
  -- freed slot puts its assignment back, a freed GPU the entries parked on it): with that index
  -- empty none of the list's lines can be served now, and the next release (or the waiters' sweep)
  -- serves them.
  if redis.call('EXISTS', P .. 'free:' .. l) == 1 then serve({ l }) end
  done = granted()
  if done then return done end
  return { 'waiting', tostring(redis.call('ZRANK', lkey, m)), string.format('%.0f', score), tostring(since) }
end

epoch_check()
expire_due()
local answers = {}
for o = 0, #ARGV - 7 - ATTEMPT_ARGS, ATTEMPT_ARGS do
  local answer = attempt(o)
  answers[#answers + 1] = #answer
  for _, v in ipairs(answer) do answers[#answers + 1] = v end
end
return reply(answers)
