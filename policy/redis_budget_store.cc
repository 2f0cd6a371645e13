#include "policy/redis_budget_store.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <map>
#include <unordered_map>
#include <unordered_set>

#include <hiredis/async.h>
#include <hiredis/hiredis.h>

#include <charconv>

#include "common/log.h"
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#include <hiredis/adapters/libuv.h>
#pragma GCC diagnostic pop

namespace tollgate {
namespace {

constexpr uint64_t kSyncDelayMs = 250;  // a dirty holder's next sync, while none is answered
constexpr size_t kMaxBatch = 256;       // operations in one script call
constexpr uint64_t kSettleDelayMs = 2;  // a settlement waits this long for a reserve to go with
constexpr size_t kSpareBatches = 4;     // answered batches kept for reuse, per worker loop
constexpr size_t kMaxInFlight = 2;  // batch scripts of the same pools on the wire, per worker loop

// What both budget scripts begin with: Redis's time, number helpers, and the sweep of a
// pool's expired holds. A holder's record expires with its last hold (its sidecar stopped,
// or lost the pool): its holds are committed, not refunded, because the calls may have run;
// a record idle for IDLE_MS with nothing held goes. Holds written per call by releases up to
// 4d1b2b4 (h: 'effort:risk:expiry', or 'effort:risk' with the expiry in the sorted set x
// before 2026-11-29) are swept the same way, for older sidecars gone during an upgrade.
constexpr const char* kScriptPrelude = R"LUA(
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local IDLE_MS = 600000 -- a holder's record with nothing held goes after this long unused
local function N(v)  -- a stored integer; '0' and missing are common and need no parse
  if v == '0' or not v then return 0 end
  return tonumber(v) or 0
end
local function I(x) return string.format('%d', x) end

-- Sweeps the pool whose keys are b, h and x. p: its budget as read (he, hr: held; ce, cr:
-- committed), changed in place, p.moved set when it changed. skip: a record left alone (the
-- sweeping holder's own). Returns the older releases' call ids it swept.
local function sweep(b, h, x, p, skip)
  local all = redis.call('HGETALL', b)
  for y = 1, #all, 2 do
    local f = all[y]
    if string.sub(f, 1, 2) == 'L:' and f ~= skip then
      local he, hr, ex, rest = string.match(all[y + 1], '^([^:]*):([^:]*):([^:]*):(.*)$')
      if he then
        he, hr = N(he), N(hr)
        if (he > 0 or hr > 0) and N(ex) <= now then
          p.he, p.hr = math.max(0, p.he - he), math.max(0, p.hr - hr)
          p.ce, p.cr, p.moved = p.ce + he, p.cr + hr, true
          redis.call('HSET', b, f, '0:0:' .. ex .. ':' .. rest)
        elseif he == 0 and hr == 0 and
               N(string.match(rest, '^[^:]*:([^:]*)')) + IDLE_MS <= now then
          redis.call('HDEL', b, f)
        end
      end
    end
  end
  local legacy, del, xdel, due = redis.call('HGETALL', h), {}, {}, nil
  for y = 1, #legacy, 2 do
    local id = legacy[y]
    if id ~= '_' then
      local e, r, ex = string.match(legacy[y + 1], '^([^:]*):([^:]*):(.*)$')
      if not e then
        e, r = string.match(legacy[y + 1], '^([^:]*):(.*)$')
        if not e then e, r = legacy[y + 1], '0' end
        if not due then
          due = {}
          for _, d in ipairs(redis.call('ZRANGEBYSCORE', x, '-inf', now, 'LIMIT', 0, 10000)) do
            due[d] = true
          end
        end
      end
      if (ex and N(ex) <= now) or (not ex and due[id]) then
        e, r = N(e), N(r)
        p.he, p.hr = math.max(0, p.he - e), math.max(0, p.hr - r)
        p.ce, p.cr, p.moved = p.ce + e, p.cr + r, true
        del[#del + 1] = id
        if not ex then xdel[#xdel + 1] = id end
      end
    end
  end
  if #del > 0 then redis.call('HDEL', h, unpack(del)) end
  if #xdel > 0 then redis.call('ZREM', x, unpack(xdel)) end
  return del
end
)LUA";

// Init and view of pools (batches have their own script, batchScript). KEYS: 6 per pool (b,
// h, x, d, m, n). ARGV: op, mode, 0, pool count, then per pool: name, effort amount, risk
// amount, effort limit, effort period ms, risk limit, risk period ms. A limit of -1: the
// policy gives the pool no budget of that dimension.
const RedisScript& budgetScript() {
  static const RedisScript script(std::string(kScriptPrelude) + R"LUA(
local op, call = ARGV[1], ARGV[2]
local per = 6  -- keys per pool
local n = #KEYS / per
local base = 4  -- init and view: ARGV index before the per-pool values
local DIMS = {'effort', 'risk'}
local GEN = 50000     -- settled call ids per generation: 50 000 to 100 000 remembered per pool
-- The holds' sentinel: a value longer than a listpack takes makes h a hash table for good.
-- As a listpack (up to 128 small fields) every field of an HMGET, HSET or HDEL is found by
-- a scan: a batch's cost grew with the batch times the holds of the pool.
local SENTINEL = '0:0:' .. string.rep('0', 64)

local function A(i, k) return ARGV[base + 7 * (i - 1) + 1 + k] end
-- Per pool: b budgets (and the holders' records), h the holds of older releases (one per
-- call), x their expiries before 2026-11-29; for init and view also d, m and n, the settled
-- ids of older releases (created for them at init, never read by a batch).
local function K(i, k) return KEYS[per * (i - 1) + k] end

-- Settled (or expired, or released) call ids: a later reserve of one is refused. They go
-- into the hash m; when it holds GEN of them it becomes n, and the n before is dropped. A
-- hash takes an id in O(1), where a sorted set trimmed by rank paid a skip list's insert,
-- its score's parse and the trim. count: ids in m (the budget's 'marks'); the new count.
local function remember(i, ids, count)
  if #ids == 0 then return count end
  local args = {}
  for x, id in ipairs(ids) do
    args[2 * x - 1] = id
    args[2 * x] = '1'
  end
  count = count + redis.call('HSET', K(i, 5), unpack(args))
  if count >= GEN then
    redis.call('UNLINK', K(i, 6))
    redis.call('RENAME', K(i, 5), K(i, 6))
    redis.call('HSET', K(i, 5), '_', '1')
    count = 0
  end
  return count
end

if op == 'init' then
  local out = {}
  for i = 1, n do
    local b = K(i, 1)
    if call ~= 'reset' and redis.call('EXISTS', b) == 1 then
      out[i] = 'exists'
    else
      redis.call('DEL', b, K(i, 2), K(i, 3), K(i, 5), K(i, 6))
      redis.call('HSET', b, 'created', I(now), 'marks', '0')
      -- Sentinels keep every key of the pool in existence, so that a slot migration moves
      -- them together and a script never sees some keys moved and others not (TRYAGAIN).
      redis.call('HSET', K(i, 2), '_', SENTINEL)
      redis.call('ZADD', K(i, 3), 'inf', '_')
      redis.call('ZADD', K(i, 4), 'inf', '_')
      redis.call('HSET', K(i, 5), '_', '1')
      redis.call('HSET', K(i, 6), '_', '1')
      for j, dim in ipairs(DIMS) do
        local limit, period = tonumber(A(i, 1 + 2 * j)), tonumber(A(i, 2 + 2 * j))
        if limit >= 0 then
          redis.call('HSET', b, dim .. ':committed', '0', dim .. ':held', '0', dim .. ':tripped',
                     '0', dim .. ':period', I(period), dim .. ':start', I(now - now % period))
        end
      end
      out[i] = 'created'
    end
  end
  return out
end

if op == 'view' then
  local out = {}
  for i = 1, n do
    local b, h = K(i, 1), K(i, 2)
    local alive = redis.call('EXISTS', b) == 1
    -- Each budget into its current period first: what the sweep commits belongs to it.
    for j, dim in ipairs(DIMS) do
      local limit, period = tonumber(A(i, 1 + 2 * j)), tonumber(A(i, 2 + 2 * j))
      if alive and limit >= 0 then
        local f = redis.call('HMGET', b, dim .. ':period', dim .. ':start')
        if N(f[1]) ~= period and N(f[1]) > 0 and now >= N(f[2]) + N(f[1]) then
          -- A new length, and the period under the old one ended: it ends now.
          redis.call('HSET', b, dim .. ':period', I(period), dim .. ':start', I(now - now % period),
                     dim .. ':committed', '0', dim .. ':tripped', '0')
        elseif N(f[1]) ~= period then
          redis.call('HSET', b, dim .. ':period', I(period), dim .. ':start', I(now - now % period))
        elseif now >= N(f[2]) + period then
          redis.call('HSET', b, dim .. ':start', I(now - now % period), dim .. ':committed', '0',
                     dim .. ':tripped', '0')
        end
      end
    end
    -- Then every expired hold is committed: the holders' (their sidecars stopped) and the
    -- calls' of older releases (marked settled for those releases).
    local p, v = {he = 0, hr = 0, ce = 0, cr = 0, moved = false}, {}
    if alive then
      v = redis.call('HMGET', b, 'effort:held', 'risk:held', 'effort:committed', 'risk:committed')
      p.he, p.hr, p.ce, p.cr = N(v[1]), N(v[2]), N(v[3]), N(v[4])
    end
    local marks = sweep(b, h, K(i, 3), p, nil)
    if alive and p.moved then
      local values, args = {p.he, p.hr, p.ce, p.cr}, {}
      for j, f in ipairs({'effort:held', 'risk:held', 'effort:committed', 'risk:committed'}) do
        if values[j] ~= N(v[j]) then
          args[#args + 1] = f
          args[#args + 1] = I(values[j])
        end
      end
      if #args > 0 then redis.call('HSET', b, unpack(args)) end
    end
    if #marks > 0 then
      local count = remember(i, marks, N(redis.call('HGET', b, 'marks')))
      if alive then redis.call('HSET', b, 'marks', I(count)) end
    end
    for j, dim in ipairs(DIMS) do
      local limit, period = tonumber(A(i, 1 + 2 * j)), tonumber(A(i, 2 + 2 * j))
      if limit >= 0 then
        if alive then
          local f = redis.call('HMGET', b, dim .. ':committed', dim .. ':held', dim .. ':start',
                               dim .. ':tripped')
          out[#out + 1] = {A(i, 0), dim, 1, N(f[1]), N(f[2]), N(f[3]) + period, N(f[4])}
        else
          out[#out + 1] = {A(i, 0), dim, 0, 0, 0, 0, 0}
        end
      end
    end
  end
  return out
end

return redis.error_reply('tollgate budget script: unknown op ' .. tostring(op))
)LUA");
  return script;
}

// The batch of one sidecar worker (its holder): the finishes and reserves of one loop turn
// on the pools of KEYS (3 per pool: b, h, x). ARGV: the reserve runs, the holder, the
// batch's number (rising per holder), ms until the holder's last hold expires; per pool (8):
// name, effort limit, effort period ms, risk limit, risk period ms, the budget's epoch
// (`created`) the sidecar holds in, a sync ('' or 'HE HR SEQ:CE:CR:TE:TR …'), the batch's
// finishes (settles, releases, expiries) summed ('' or 'HE HR CE CR TE TR': the holds that
// end, what of them is committed, 1 where one trips the pool); then per run of identical
// reserves 'COUNT E R [E R …]' (per pool the effort and the risk each asks).
//
// A holder's holds are one record in each pool's budget hash, `L:<holder>` =
// 'effort:risk:expiry:fence:last:applied' (what it holds; when the record expires, Redis
// time; the lowest batch it takes; its last batch; the last batch that ran): Redis never
// reads or writes a call id, the sidecar keeps its calls. The finishes go first, then the
// reserves in order, each exactly as it would alone: a loop turn's operations are
// concurrent, and this is one order of them. The answer: per pool its epoch ('0': missing),
// then per run the reserves allowed, or {allowed, status, pool, reason} when the rest were
// refused.
//
// A sync follows a batch whose answer was lost (it may or may not have run): it sets the
// holder's record to the holds the sidecar knows, commits what the lost batches would have
// committed unless they ran (a holder's batches on the wire run in order: a lost one ran if
// the record's `applied` reached it; one that certainly did not run, marked '!', is
// committed whatever `applied` says, since a batch sent again after TRYAGAIN can fall
// behind a later one), and fences older batches off (a lost batch can arrive late from a
// dropped connection: it is refused, STALE). A batch of another epoch (the budget was
// flushed and initialised again, or reset) has its finishes and sync ignored: those holds
// went with the budget. The script is lean on purpose: it runs for every batch of every
// sidecar on Redis's one thread, and its cost is Lua's (numbers are parsed only where they
// are not zero, the risk fields read only for pools with a risk budget).
const RedisScript& batchScript() {
  static const RedisScript script(std::string(kScriptPrelude) + R"LUA(
local n = #KEYS / 3
local runs, holder, seqs, ttl = tonumber(ARGV[1]), ARGV[2], ARGV[3], tonumber(ARGV[4])
local seq, hf = tonumber(seqs), 'L:' .. holder

-- Rolls pool p's dimension d ('e' effort, 'r' risk) into its current period: its fields
-- are p.f<d> (the stored period), p.p<d> (the policy's), p.s<d>, p.c<d>, p.t<d>, p.roll<d>.
local function roll(p, d)
  local period = p['p' .. d]
  if p['f' .. d] ~= period then
    -- A new length (a reload): a period that ended under the old one ends now, its spend
    -- and trip with it.
    local old = N(p['f' .. d])
    if old > 0 and now >= p['s' .. d] + old then p['c' .. d], p['t' .. d] = 0, 0 end
    p['f' .. d], p['s' .. d], p['roll' .. d] = period, now - now % tonumber(period), true
  elseif now >= p['s' .. d] + tonumber(period) then
    p['s' .. d], p['c' .. d], p['t' .. d], p['roll' .. d] = now - now % tonumber(period), 0, 0, true
  end
end

-- Per pool, read once: its budget (e: effort, r: risk: committed c, held h, start s,
-- tripped t, stored period f) and this holder's record (its holds re, rr; fence; applied).
local P, out = {}, {}
for i = 1, n do
  local o = 5 + 8 * (i - 1)
  local b, risk = KEYS[3 * i - 2], ARGV[o + 3] ~= '-1'
  local v
  if risk then
    v = redis.call('HMGET', b, 'created', 'swept', hf, 'effort:committed', 'effort:held',
                   'effort:period', 'effort:start', 'effort:tripped', 'risk:committed', 'risk:held',
                   'risk:period', 'risk:start', 'risk:tripped')
  else
    v = redis.call('HMGET', b, 'created', 'swept', hf, 'effort:committed', 'effort:held',
                   'effort:period', 'effort:start', 'effort:tripped')
  end
  local p = {name = ARGV[o], live = v[1] ~= false, valid = v[1] == ARGV[o + 5], sweep = false,
             moved = false, le = tonumber(ARGV[o + 1]), lr = tonumber(ARGV[o + 3]),
             pe = ARGV[o + 2], pr = ARGV[o + 4], ce = 0, he = 0, se = 0, te = 0, fe = v[6],
             cr = 0, hr = 0, sr = 0, tr = 0, fr = v[11], re = 0, rr = 0, fence = 0, applied = 0,
             rolle = false, rollr = false, swept = false}
  out[i] = v[1] or '0'
  if p.live then
    p.sweep = now >= N(v[2]) + 1000  -- other holders' expired records: once a second
    p.ce, p.he, p.se, p.te = N(v[4]), N(v[5]), N(v[7]), N(v[8])
    if risk then p.cr, p.hr, p.sr, p.tr = N(v[9]), N(v[10]), N(v[12]), N(v[13]) end
    -- Into the current period before anything moves: a settle, an expiry or a trip after
    -- the period's end belongs to the new period, not to the one whose roll would drop it.
    if p.le >= 0 then roll(p, 'e') end
    if risk then roll(p, 'r') end
    if v[3] then
      local he, hr, ex, fence, applied =
          string.match(v[3], '^([^:]*):([^:]*):([^:]*):([^:]*):[^:]*:([^:]*)$')
      if he then
        p.re, p.rr, p.fence, p.applied = N(he), N(hr), N(fence), N(applied)
        -- Expired and holding nothing: another holder's sweep committed what it held (or
        -- it had settled everything, and no lost batch is past `applied`).
        p.swept = N(ex) <= now and p.re == 0 and p.rr == 0
      end
    end
    if p.fence > seq then
      return redis.error_reply('STALE tollgate budget batch ' .. seqs .. ' of ' .. holder ..
                               ' came after its sync')
    end
  end
  P[i] = p
end

local function commit(p, ce, cr, te, tr)
  if p.le >= 0 then
    if ce > 0 then p.ce, p.moved = p.ce + ce, true end
    if te then p.te, p.rolle, p.moved = 1, true, true end
  end
  if p.lr >= 0 then
    if cr > 0 then p.cr, p.moved = p.cr + cr, true end
    if tr then p.tr, p.rollr, p.moved = 1, true, true end
  end
end

for i = 1, n do
  local p = P[i]
  local o = 5 + 8 * (i - 1)
  -- Other holders' expired records (their sidecars stopped), once a second (`swept`).
  if p.live and p.sweep then sweep(KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i], p, hf) end
  if p.live and not p.valid and ARGV[o + 6] ~= '' then
    -- A sync from a worker that does not know this epoch (its batch that met it was lost):
    -- what its record holds came from lost batches, whose calls were halted.
    if p.re ~= 0 or p.rr ~= 0 then
      p.he, p.hr = math.max(0, p.he - p.re), math.max(0, p.hr - p.rr)
      p.re, p.rr, p.moved = 0, 0, true
    end
    p.fence = seq
  end
  if p.live and p.valid then
    -- A sync: the holds the sidecar knows, the commits of lost batches that did not run (a
    -- holder's batches run in order), and a fence against those still to arrive.
    local sync = ARGV[o + 6]
    if sync ~= '' then
      local w = {}
      for y in string.gmatch(sync, '%S+') do w[#w + 1] = y end
      for y = 3, #w do
        -- '!': the batch certainly did not run (it may be older than one that did).
        local bang, q, ce, cr, te, tr =
            string.match(w[y], '^(!?)([^:]*):([^:]*):([^:]*):([^:]*):(.*)$')
        if q and (bang == '!' or N(q) > p.applied) then
          -- Swept meanwhile: the sweep committed the holds these settles would have; only
          -- their trips are still to record.
          if p.swept then
            commit(p, 0, 0, te == '1', tr == '1')
          else
            commit(p, N(ce), N(cr), te == '1', tr == '1')
          end
        end
      end
      local we, wr = N(w[1]), N(w[2])
      -- The holds the sidecar knows were committed by that sweep: not held again.
      if p.swept then we, wr = 0, 0 end
      if we ~= p.re or wr ~= p.rr then
        p.he, p.hr = math.max(0, p.he + we - p.re), math.max(0, p.hr + wr - p.rr)
        p.re, p.rr, p.moved = we, wr, true
      end
      p.fence = seq
    end
    -- The batch's finishes, summed: never more than the record holds (a sweep may have
    -- committed an expired record; what it committed is not committed again).
    local fin = ARGV[o + 7]
    if fin ~= '' then
      local he, hr, ce, cr, te, tr = string.match(fin, '^(%S+) (%S+) (%S+) (%S+) (%S+) (%S+)$')
      he, hr, ce, cr = N(he), N(hr), N(ce), N(cr)
      local ue, ur = math.min(he, p.re), math.min(hr, p.rr)
      p.he, p.hr, p.re, p.rr, p.moved = p.he - ue, p.hr - ur, p.re - ue, p.rr - ur, true
      commit(p, math.max(0, ce - (he - ue)), math.max(0, cr - (hr - ur)), te == '1', tr == '1')
    end
  end
end

-- Why a reserve asking a (amounts per pool, effort then risk) is refused, or false.
local DIMS = {e = 'effort', r = 'risk'}
local function refusal(a)
  for i = 1, n do
    local p = P[i]
    -- An overrun on either dimension trips the whole pool (of the dimensions the policy
    -- has: the flag of one a reload removed is neither rolled nor heeded).
    if p.live and ((p.le >= 0 and p.te ~= 0) or (p.lr >= 0 and p.tr ~= 0)) and
        (a[2 * i - 1] > 0 or a[2 * i] > 0) then
      return {'budget_tripped', p.name, 'pool ' .. p.name .. ' was tripped by an overrun this period'}
    end
    for _, d in ipairs({'e', 'r'}) do
      local amount = a[d == 'e' and 2 * i - 1 or 2 * i]
      if amount > 0 then
        local lim = d == 'e' and p.le or p.lr
        if lim < 0 then
          return {'budget_uninitialised', p.name,
                  'pool ' .. p.name .. ' has no ' .. DIMS[d] .. ' budget in the store'}
        end
        if not p.live then
          return {'budget_uninitialised', p.name, 'pool ' .. p.name .. ' is missing from ' ..
                  'the store (never initialised, or flushed): run tollgate pools init'}
        end
        local used = d == 'e' and p.ce + p.he or p.cr + p.hr
        if used + amount > lim then
          return {'budget_exhausted', p.name,
                  'pool ' .. p.name .. ' ' .. DIMS[d] .. ': ' .. I(used) .. ' of ' .. I(lim) ..
                  ' spent or held, ' .. I(amount) .. ' more asked'}
        end
      end
    end
  end
  return false
end

-- The reserves: a run of COUNT identical ones takes as many as fit, in one step.
local at = 5 + 8 * n
for r = 1, runs do
  local w, a = {}, {}
  for y in string.gmatch(ARGV[at], '%S+') do w[#w + 1] = tonumber(y) end
  local count = w[1]
  for k = 1, 2 * n do a[k] = w[k + 1] or 0 end
  local no, fit = refusal(a), 0
  if not no then
    fit = count
    for i = 1, n do
      local p = P[i]
      local e, q = a[2 * i - 1], a[2 * i]
      if e > 0 then fit = math.min(fit, math.floor((p.le - p.ce - p.he) / e)) end
      if q > 0 then fit = math.min(fit, math.floor((p.lr - p.cr - p.hr) / q)) end
    end
    for i = 1, n do
      local p = P[i]
      local e, q = a[2 * i - 1], a[2 * i]
      if e > 0 then p.he, p.re, p.moved = p.he + fit * e, p.re + fit * e, true end
      if q > 0 then p.hr, p.rr, p.moved = p.hr + fit * q, p.rr + fit * q, true end
    end
    if fit < count then no = refusal(a) end
  end
  out[n + r] = no and {fit, no[1], no[2], no[3]} or fit
  at = at + 1
end

-- Write back, one command per budget.
for i = 1, n do
  local p = P[i]
  if p.live then
    local args = {hf, I(p.re) .. ':' .. I(p.rr) .. ':' .. I(now + ttl) .. ':' .. I(p.fence) ..
                      ':' .. I(now) .. ':' .. I(math.max(p.applied, seq))}
    local function put(k, v)
      args[#args + 1] = k
      args[#args + 1] = v
    end
    if p.le >= 0 then
      if p.rolle then
        put('effort:period', p.fe) put('effort:start', I(p.se)) put('effort:tripped', I(p.te))
      end
      if p.moved or p.rolle then put('effort:committed', I(p.ce)) put('effort:held', I(p.he)) end
    end
    if p.lr >= 0 then
      if p.rollr then
        put('risk:period', p.fr) put('risk:start', I(p.sr)) put('risk:tripped', I(p.tr))
      end
      if p.moved or p.rollr then put('risk:committed', I(p.cr)) put('risk:held', I(p.hr)) end
    end
    if p.sweep then put('swept', I(now)) end
    redis.call('HSET', KEYS[3 * i - 2], unpack(args))
  end
end
return out
)LUA");
  return script;
}

// Cascade quarantines shared by every sidecar: a sorted set of agent globs by the end of
// their quarantine (Redis time, ms), and a message on kSignals for the sidecars running.
// ARGV: op ("share" glob ttl-ms | "list").
const RedisScript& signalScript() {
  static const RedisScript script(R"LUA(
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ARGV[1] == 'share' then
  local ttl = tonumber(ARGV[3])
  redis.call('ZADD', KEYS[1], 'GT', now + ttl, ARGV[2])
  redis.call('PUBLISH', ARGV[4], 'quarantine ' .. string.format('%d', ttl) .. ' ' .. ARGV[2])
  return 1
end
local out = {}
local v = redis.call('ZRANGEBYSCORE', KEYS[1], now + 1, '+inf', 'WITHSCORES')
for i = 1, #v, 2 do out[#out + 1] = {v[i], tonumber(v[i + 1]) - now} end
return out
)LUA");
  return script;
}

constexpr const char* kQuarantineKey = "tollgate:{signals}:quarantine";
constexpr const char* kSignals = "tollgate:signals";
constexpr int64_t kResubscribeMs = 500;

BudgetStatus statusOf(std::string_view s) {
  if (s == "ok") return BudgetStatus::kOk;
  if (s == "budget_exhausted") return BudgetStatus::kExhausted;
  if (s == "budget_tripped") return BudgetStatus::kTripped;
  if (s == "budget_uninitialised") return BudgetStatus::kUninitialised;
  if (s == "unknown_call") return BudgetStatus::kUnknownCall;
  return BudgetStatus::kUnavailable;
}

// A pool's keys, in the script's order: budgets, holds, legacy expiries, legacy settled ids,
// settled ids (this generation, the last).
constexpr char kPoolKeys[] = {'b', 'h', 'x', 'd', 'm', 'n'};

std::string keyOf(const std::string& pool, char kind) {
  return "tollgate:{" + pool + "}:" + kind;
}

BudgetOutcome unavailable(std::string reason) {
  return BudgetOutcome{BudgetStatus::kUnavailable, "", std::move(reason), 0};
}

}  // namespace

// The one subscription of the process to kSignals, on the first worker's loop; it
// reconnects every 500 ms while it cannot, and reads the quarantines in force each time it
// (re)subscribes, so that none is missed while it was away.
struct RedisBudgetStore::Subscriber {
  RedisBudgetStore* store;
  uv_loop_t* loop;
  RedisClient* client;  // the same loop's client, for the snapshot
  redisAsyncContext* ac = nullptr;
  uv_timer_t* timer = nullptr;
  size_t seed = 0;
  bool closing = false;
  // Expires with the subscriber: a snapshot still in flight when it is freed (at shutdown)
  // finds it gone instead of reading freed memory.
  std::shared_ptr<char> alive = std::make_shared<char>();

  void start() {
    timer = new uv_timer_t;
    uv_timer_init(loop, timer);
    timer->data = this;
    connect();
  }
  void retry() {
    if (closing) return;
    uv_timer_start(
        timer, [](uv_timer_t* t) { static_cast<Subscriber*>(t->data)->connect(); }, kResubscribeMs,
        0);
  }
  void connect() {
    const auto& seeds = store->options_.seeds;
    const auto& where = seeds[seed++ % seeds.size()];
    ac = redisAsyncConnect(where.host.c_str(), where.port);
    if (!ac || ac->err || redisLibuvAttach(ac, loop) != REDIS_OK) {
      if (ac) redisAsyncFree(ac);
      ac = nullptr;
      retry();
      return;
    }
    ac->data = this;
    // A subscription only listens: without keepalive, a peer gone without a reset (a host
    // down, a partition) would never be noticed, and nothing would be resubscribed.
    redisEnableKeepAlive(&ac->c);
    redisAsyncSetConnectCallback(ac, [](const redisAsyncContext* c, int status) {
      auto* self = static_cast<Subscriber*>(c->data);
      if (status != REDIS_OK && self->ac == c) {
        self->ac = nullptr;  // hiredis frees it
        self->retry();
      }
    });
    redisAsyncSetDisconnectCallback(ac, [](const redisAsyncContext* c, int) {
      auto* self = static_cast<Subscriber*>(c->data);
      if (self->ac != c) return;
      self->ac = nullptr;
      self->retry();
    });
    // AUTH first; refused, the connection goes and is tried again later.
    redisSendAuth(
        ac, store->options_.auth,
        [](redisAsyncContext* c, void* raw, void*) {
          auto* r = static_cast<redisReply*>(raw);
          if (r && r->type == REDIS_REPLY_ERROR) redisAsyncDisconnect(c);
        },
        nullptr);
    redisAsyncCommand(ac, onMessage, this, "SUBSCRIBE %s", kSignals);
  }
  static void onMessage(redisAsyncContext*, void* raw, void* privdata) {
    auto* self = static_cast<Subscriber*>(privdata);
    auto* r = static_cast<redisReply*>(raw);
    if (!r || self->closing || r->type != REDIS_REPLY_ARRAY || r->elements < 3) return;
    std::string_view kind(r->element[0]->str ? r->element[0]->str : "");
    if (kind == "subscribe") {
      self->snapshot();
      return;
    }
    if (kind != "message" || !r->element[2]->str) return;
    // "quarantine TTL_MS GLOB"
    std::string_view msg(r->element[2]->str, r->element[2]->len);
    if (!msg.starts_with("quarantine ")) return;
    msg.remove_prefix(11);
    auto sp = msg.find(' ');
    if (sp == std::string_view::npos) return;
    int64_t ttl = 0;
    auto [end, ec] = std::from_chars(msg.data(), msg.data() + sp, ttl);
    if (ec != std::errc() || ttl <= 0) return;
    if (self->store->onSharedQuarantine)
      self->store->onSharedQuarantine(std::string(msg.substr(sp + 1)),
                                      std::chrono::milliseconds(ttl));
  }
  void snapshot() {
    std::weak_ptr<char> token = alive;
    client->eval(signalScript(), {kQuarantineKey}, {"list"}, [this, token](Result<RedisReply> r) {
      if (token.expired() || closing) return;
      if (!r || r.value().type != RedisReply::Type::kArray) {
        // The worker's client could not ask (its breaker still open after the blip that
        // dropped the subscription): subscribe again later, which asks again.
        if (auto* c = ac) redisAsyncDisconnect(c);
        return;
      }
      for (const auto& e : r.value().elements) {
        if (e.elements.size() == 2 && e.elements[1].integer > 0 && store->onSharedQuarantine)
          store->onSharedQuarantine(e.elements[0].str,
                                    std::chrono::milliseconds(e.elements[1].integer));
      }
    });
  }
  void close(std::function<void()> done) {
    closing = true;
    if (auto* c = ac) {
      ac = nullptr;
      redisAsyncFree(c);
    }
    struct Closing {
      Subscriber* self;
      std::function<void()> done;
    };
    timer->data = new Closing{this, std::move(done)};
    uv_close(reinterpret_cast<uv_handle_t*>(timer), [](uv_handle_t* h) {
      auto* c = static_cast<Closing*>(h->data);
      delete reinterpret_cast<uv_timer_t*>(h);
      auto fn = std::move(c->done);
      delete c->self;
      delete c;
      fn();
    });
  }
};

// Operations on the same pools in one loop turn, sent as one script call.
struct RedisBudgetStore::BatchOp {
  char kind;  // 'R' reserve, 'S' settle, 'L' release, 'X' an expiry (nobody waits for it)
  uint64_t started;
  Done done;
  const std::string* callId;  // a reserve's, its key in `calls` (kept while it is pending)
  BudgetOutcome outcome;      // a finish's answer, known when it was queued
};

struct RedisBudgetStore::Batch {
  std::vector<PoolSpec> pools;
  std::vector<std::string> specs;  // one per reserve: per pool the two amounts
  std::vector<size_t> runs;        // reserves in each run of identical specs, as sent
  std::vector<BatchOp> ops;
  // Per pool: the holds the batch's finishes end, what they commit, what they trip.
  std::vector<std::array<int64_t, 2>> ended, committed;
  std::vector<std::array<bool, 2>> trips;
  std::vector<bool> synced;  // per pool: the batch carries its holder's sync
  uint64_t seq = 0;
  // Empties it, keeping its buffers: answered batches are reused, so that a loop turn's
  // batch does not grow its vectors again (past 1 KB, a growth makes malloc consolidate
  // every small chunk freed since the last one).
  void clear() {
    pools.clear();
    specs.clear();
    runs.clear();
    ops.clear();
    ended.clear();
    committed.clear();
    trips.clear();
    synced.clear();
    seq = 0;
  }
};

// This worker's holds in one pool, as the sidecar knows them. `held` counts the calls whose
// reserve was answered ok and whose finish has not been sent; a batch whose answer was lost
// makes the holder dirty: the next batch on the pool carries a sync.
struct RedisBudgetStore::Holder {
  struct Lost {
    uint64_t seq;
    std::array<int64_t, 2> committed;
    std::array<bool, 2> trips;
    // Certainly never ran (RedisClient::kNotRun, or an error reply): its commits are due
    // even when a later batch of the holder ran first, as one may when this one was sent
    // again after TRYAGAIN while the later one went straight through.
    bool unrun = false;
  };
  std::string epoch;  // the budget's `created` as last answered ("": none yet)
  uint64_t gen = 0;   // counts the epochs seen: a call held in an older one holds nothing
  std::array<int64_t, 2> held{0, 0};
  bool dirty = false;
  uint64_t dirtySeq = 0;   // the last lost batch
  std::vector<Lost> lost;  // lost batches that committed: the sync commits them unless they ran
  size_t inFlight = 0;     // batches with this pool on the wire
};

// A call this worker holds budget for, from its reserve to its finish.
struct RedisBudgetStore::Call {
  std::vector<Charge> holds;   // per pool charged: the effort and risk held (>= 0)
  uint64_t gen = 0;            // the first pool's holder generation it is held in
  std::vector<uint64_t> gens;  // the other pools' (a call charges one pool, mostly)
  uint64_t expiresMs = 0;
  bool pending = true;        // the reserve is on the wire
  std::vector<Done> waiters;  // the same call id reserved again meanwhile
  // Held calls are a list in the order of their expiry, through the calls themselves (an
  // element of `calls` stays where it is): no allocation or rebalancing per call.
  Call* prevExpiry = nullptr;
  Call* nextExpiry = nullptr;
  const std::string* id = nullptr;  // its key in `calls`, while it is in that list
};

struct RedisBudgetStore::PerLoop {
  RedisBudgetStore* store;
  uv_loop_t* loop;
  std::unique_ptr<RedisClient> client;
  Subscriber* subscriber = nullptr;
  std::map<std::string, Batch> batches;  // by the pools charged
  std::vector<Batch> spare;              // answered batches, empty, kept for their buffers
  uv_check_t* check = nullptr;
  uv_idle_t* idle = nullptr;
  uv_timer_t* syncTimer = nullptr;    // syncs dirty holders, traffic or not
  uv_timer_t* settleTimer = nullptr;  // sends finishes that no reserve took along
  uv_timer_t* expiryTimer = nullptr;  // finishes calls whose holds expired
  // Set by detach(), which closes the handles above (and frees them) while batches may
  // still be on the wire: their answers, and what those answers send, touch none of them.
  bool detached = false;
  bool armed = false;
  bool flushing = false, flushAgain = false;
  std::map<std::string, size_t> inFlight;  // batch scripts sent and not answered, by pools
  std::string holder;                      // this worker's name in the pools' budgets
  std::shared_ptr<const std::vector<PoolSpec>> specs;  // the policy's pools, as last read
  uint64_t specsVersion = UINT64_MAX;
  uint64_t seq = 0;                                 // its last batch's number
  uint64_t lastExpiryMs = 0;                        // the latest expiry of any hold it took
  std::unordered_map<std::string, Holder> holders;  // by pool
  std::unordered_map<std::string, Call> calls;
  RecentlyExpired<Call> expired;       // for settles that come after their hold expired
  std::vector<const PoolSpec*> found;  // batchFor's scratch: the specs of a call's pools
  Call* firstExpiry = nullptr;         // the held calls, the soonest to expire first
  Call* lastExpiry = nullptr;
  // Call ids finished here (settled, released, expired): a reserve of one is refused. A call
  // id is minted by one sidecar and operated on by it alone.
  FinishedCalls done;

  // Puts a held call in the expiry list (from its end: holds mostly expire in the order they
  // were taken), and takes it out.
  void queueExpiry(Call* c, const std::string* key) {
    c->id = key;
    Call* after = lastExpiry;
    while (after && after->expiresMs > c->expiresMs) after = after->prevExpiry;
    c->prevExpiry = after;
    c->nextExpiry = after ? after->nextExpiry : firstExpiry;
    (c->nextExpiry ? c->nextExpiry->prevExpiry : lastExpiry) = c;
    (after ? after->nextExpiry : firstExpiry) = c;
  }
  void unqueueExpiry(Call* c) {
    if (!c->id) return;
    (c->prevExpiry ? c->prevExpiry->nextExpiry : firstExpiry) = c->nextExpiry;
    (c->nextExpiry ? c->nextExpiry->prevExpiry : lastExpiry) = c->prevExpiry;
    c->prevExpiry = c->nextExpiry = nullptr;
    c->id = nullptr;
  }
};

namespace {
// The calling worker's client. One Redis store per process, so one slot per thread.
thread_local void* tlsPerLoop = nullptr;
thread_local const void* tlsOwner = nullptr;

uint64_t nowMs() {
  return uv_hrtime() / 1'000'000;
}
}  // namespace

RedisBudgetStore::PerLoop* RedisBudgetStore::local() const {
  return tlsOwner == this ? static_cast<PerLoop*>(tlsPerLoop) : nullptr;
}

Result<std::vector<RedisBudgetStore::PoolSpec>> RedisBudgetStore::specsOf(const PolicySet& set) {
  auto plain = [](const std::string& name) {
    return !name.empty() && name.size() <= 128 && std::all_of(name.begin(), name.end(), [](char c) {
      return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '.' || c == ':' ||
             c == '-';
    });
  };
  std::vector<PoolSpec> out;
  for (const auto& p : set.pools()) {
    if (!plain(p.name)) {
      return Error{-1, p.mark.str() + ": pool '" + p.name +
                           "': the Redis store needs pool names of letters, digits and _ . : -"};
    }
    PoolSpec s;
    s.name = p.name;
    if (p.effort) s.effortLimit = p.effort->limit, s.effortPeriodMs = p.effort->period.count();
    if (p.risk) s.riskLimit = p.risk->limit, s.riskPeriodMs = p.risk->period.count();
    s.failOpen = p.failOpen;
    s.slot = redisKeySlot(keyOf(p.name, 'b'));
    out.push_back(std::move(s));
  }
  return out;
}

Result<std::unique_ptr<RedisBudgetStore>> RedisBudgetStore::create(const PolicySet& set,
                                                                   Options options) {
  if (options.seeds.empty()) return Error{-1, "store.urls: at least one Redis URL is needed"};
  std::unique_ptr<RedisBudgetStore> store(new RedisBudgetStore(options));
  if (auto st = store->declare(set); !st) return st.error();
  if (options.initMissing) {
    auto created = initPools(set, options, false);
    if (!created) return created.error();
    for (const auto& r : created.value()) {
      if (r.created) Log::Line(LogLevel::kWarn, "pool initialised").add("pool", r.pool).emit();
    }
  }
  return store;
}

RedisBudgetStore::~RedisBudgetStore() {
  if (tlsOwner == this) tlsOwner = nullptr;
}

Status RedisBudgetStore::validate(const PolicySet& set) const {
  auto specs = specsOf(set);
  return specs ? Status::success() : Status(specs.error());
}

Status RedisBudgetStore::declare(const PolicySet& set) {
  auto specs = specsOf(set);
  if (!specs) return specs.error();
  // With init_missing, a pool a reload adds is created as one at start is (without it, every
  // call it charges would halt as budget_uninitialised until `pools init`). Only the pools
  // new to this set: the others were created, or found, already.
  std::vector<PoolSpec> added;
  std::shared_ptr<const std::vector<PoolSpec>> before;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    before = specs_;
    specs_ = std::make_shared<const std::vector<PoolSpec>>(std::move(specs.value()));
    if (before && options_.initMissing) {
      for (const auto& s : *specs_) {
        bool known = std::any_of(before->begin(), before->end(),
                                 [&](const PoolSpec& b) { return b.name == s.name; });
        if (!known) added.push_back(s);
      }
    }
  }
  specsVersion_.fetch_add(1, std::memory_order_release);
  if (!added.empty()) {
    // The reload stands either way: a pool Redis could not create now stays uninitialised
    // (its calls halted, fail closed) until `pools init` or the next reload's attempt.
    auto created = initSpecs(added, options_, false);
    if (!created) {
      Log::Line(LogLevel::kWarn, "pool not initialised")
          .add("error", created.error().message)
          .emit();
    } else {
      for (const auto& r : created.value()) {
        if (r.created) Log::Line(LogLevel::kWarn, "pool initialised").add("pool", r.pool).emit();
      }
    }
  }
  return Status::success();
}

std::shared_ptr<const std::vector<RedisBudgetStore::PoolSpec>> RedisBudgetStore::specs() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return specs_;
}

void RedisBudgetStore::attach(uv_loop_t* loop) {
  auto* l = new PerLoop{};
  l->store = this;
  l->loop = loop;
  l->holder = newHolderId();  // unique in the process and across processes
  l->client = std::make_unique<RedisClient>(
      loop, RedisClient::Options{options_.seeds, options_.timeout, options_.auth});
  l->check = new uv_check_t;
  uv_check_init(loop, l->check);
  l->check->data = l;
  l->idle = new uv_idle_t;
  uv_idle_init(loop, l->idle);
  for (auto** t : {&l->syncTimer, &l->settleTimer, &l->expiryTimer}) {
    *t = new uv_timer_t;
    uv_timer_init(loop, *t);
    (*t)->data = l;
  }
  // Neither keeps the loop alive on its own: at shutdown the holder's record expires.
  uv_unref(reinterpret_cast<uv_handle_t*>(l->syncTimer));
  uv_unref(reinterpret_cast<uv_handle_t*>(l->expiryTimer));
  tlsPerLoop = l;
  tlsOwner = this;
  if (!subscribed_.exchange(true)) {
    l->subscriber = new Subscriber{this, loop, l->client.get()};
    l->subscriber->start();
  }
}

void RedisBudgetStore::shareQuarantine(const std::string& glob, std::chrono::milliseconds ttl) {
  PerLoop* l = local();
  if (!l) return;
  l->client->eval(signalScript(), {kQuarantineKey},
                  {"share", glob, std::to_string(ttl.count()), kSignals},
                  [glob](Result<RedisReply> r) {
                    if (!r || r.value().isError()) {
                      Log::Line(LogLevel::kWarn, "cascade quarantine not shared")
                          .add("agents", glob)
                          .add("error", r ? r.value().str : r.error().message)
                          .emit();
                    }
                  });
}

void RedisBudgetStore::detach(std::function<void()> done) {
  PerLoop* l = local();
  tlsPerLoop = nullptr;
  tlsOwner = nullptr;
  if (!l) {
    done();
    return;
  }
  size_t dirty = 0;
  for (const auto& [pool, h] : l->holders) dirty += h.dirty;
  if (dirty > 0 || !l->calls.empty()) {
    Log::Line(LogLevel::kWarn, "budget holds not finished at shutdown; they expire and commit")
        .add("calls", static_cast<uint64_t>(l->calls.size()))
        .add("pools_unsynced", static_cast<uint64_t>(dirty))
        .emit();
  }
  // What waits for this turn's batch goes now; then batches still on the wire are waited
  // for (each within its deadline).
  flush(l, true);
  l->detached = true;
  uv_close(reinterpret_cast<uv_handle_t*>(l->check),
           [](uv_handle_t* h) { delete reinterpret_cast<uv_check_t*>(h); });
  uv_close(reinterpret_cast<uv_handle_t*>(l->idle),
           [](uv_handle_t* h) { delete reinterpret_cast<uv_idle_t*>(h); });
  for (auto* t : {l->syncTimer, l->settleTimer, l->expiryTimer}) {
    uv_close(reinterpret_cast<uv_handle_t*>(t),
             [](uv_handle_t* h) { delete reinterpret_cast<uv_timer_t*>(h); });
  }
  l->check = nullptr;
  l->idle = nullptr;
  l->syncTimer = l->settleTimer = l->expiryTimer = nullptr;
  auto closeClient = [l, done = std::move(done)] {
    l->client->close(
        [l, done] {
          delete l;
          done();
        },
        true);
  };
  if (l->subscriber) {
    l->subscriber->close(std::move(closeClient));
    l->subscriber = nullptr;
  } else {
    closeClient();
  }
}

// The batch for these pools in this loop turn (created with their specs if new).
RedisBudgetStore::Batch* RedisBudgetStore::batchFor(PerLoop* l, const std::vector<Charge>& pools,
                                                    std::string* key, BudgetOutcome* refusal) {
  // The policy's pools, as this worker last read them (declare() bumps the version).
  if (uint64_t v = specsVersion_.load(std::memory_order_acquire); v != l->specsVersion) {
    l->specs = this->specs();
    l->specsVersion = v;
  }
  const auto& specs = l->specs;
  key->clear();
  auto& found = l->found;
  found.clear();
  for (size_t i = 0; i < pools.size(); ++i) {
    const auto& c = pools[i];
    const PoolSpec* pool = nullptr;
    for (const auto& sp : *specs) {
      if (sp.name == c.pool) pool = &sp;
    }
    if (!pool) {
      *refusal = BudgetOutcome{BudgetStatus::kUninitialised, c.pool,
                               "pool " + c.pool + " is not in the policy set", 0};
      return nullptr;
    }
    if (!found.empty() && pool->slot != found.front()->slot) {
      *refusal = unavailable("pools " + pools[0].pool + " and " + c.pool +
                             " are in different Redis slots; a call charges pools of one hash tag");
      return nullptr;
    }
    *key += c.pool;
    *key += '\n';
    found.push_back(pool);
  }
  auto& batch = l->batches[*key];
  if (batch.pools.empty()) {
    if (!l->spare.empty()) {
      batch = std::move(l->spare.back());
      l->spare.pop_back();
    }
    for (const PoolSpec* p : found) batch.pools.push_back(*p);
    batch.ended.assign(found.size(), {0, 0});
    batch.committed.assign(found.size(), {0, 0});
    batch.trips.assign(found.size(), {false, false});
  }
  return &batch;
}

// Queues an operation; a reserve goes at the end of this loop turn, a finish with the next
// reserve on its pools or after kSettleDelayMs.
void RedisBudgetStore::enqueue(PerLoop* l, Batch& batch, std::string spec, BatchOp op) {
  bool reserve = op.kind == 'R';
  if (reserve) batch.specs.push_back(std::move(spec));
  batch.ops.push_back(std::move(op));
  if (batch.ops.size() >= kMaxBatch) {
    // Large enough: it goes now (a script's arguments are bounded), unless it must wait.
    flush(l);
    return;
  }
  // Nothing waits for a finish: it goes with the next reserve on its pools, or after
  // kSettleDelayMs when none comes, so that a call costs Redis one script call, not two,
  // when each loop turn sees few calls. Its hold stays counted until then.
  if (l->detached) {  // no handle to wait on: it goes now
    flush(l, true);
    return;
  }
  if (!reserve) {
    if (!l->armed && !uv_is_active(reinterpret_cast<uv_handle_t*>(l->settleTimer))) {
      uv_timer_start(
          l->settleTimer,
          [](uv_timer_t* t) {
            auto* pl = static_cast<PerLoop*>(t->data);
            pl->store->flush(pl);
          },
          kSettleDelayMs, 0);
    }
    return;
  }
  if (!l->armed) {
    l->armed = true;
    uv_check_start(l->check, [](uv_check_t* h) {
      auto* pl = static_cast<PerLoop*>(h->data);
      pl->store->flush(pl);
    });
    // An idle handle keeps the loop from blocking in poll while a batch waits.
    uv_idle_start(l->idle, [](uv_idle_t*) {});
  }
}

void RedisBudgetStore::reserve(const std::string& callId, const std::vector<Charge>& charges,
                               std::chrono::milliseconds holdTtl, Done done) {
  PerLoop* l = local();
  if (!l) {
    done(unavailable("no Redis connection on this thread"));
    return;
  }
  if (auto it = l->calls.find(callId); it != l->calls.end()) {
    // The same call again: charged once.
    if (it->second.pending) {
      it->second.waiters.push_back(std::move(done));
    } else {
      if (observer) observer("reserve", BudgetStatus::kOk, 0);
      done(BudgetOutcome{});
    }
    return;
  }
  if (l->done.contains(callId)) {
    BudgetOutcome out{BudgetStatus::kUnknownCall, "", "call " + callId + " was already settled", 0};
    if (observer) observer("reserve", out.status, 0);
    done(std::move(out));
    return;
  }
  std::string key;
  BudgetOutcome refusal;
  Batch* batch = batchFor(l, charges, &key, &refusal);
  if (!batch) {
    if (observer) observer("reserve", refusal.status, 0);
    done(std::move(refusal));
    return;
  }
  char buf[24];
  std::string spec;  // per pool the two amounts; identical ones go as one run
  Call call;
  for (const auto& c : charges) {
    for (int64_t v : {c.effort, c.risk}) {
      spec += ' ';
      spec.append(buf, static_cast<size_t>(std::to_chars(buf, buf + sizeof buf, v).ptr - buf));
    }
    call.holds.push_back(
        Charge{c.pool, std::max<int64_t>(c.effort, 0), std::max<int64_t>(c.risk, 0)});
  }
  call.expiresMs = nowMs() + static_cast<uint64_t>(std::max<int64_t>(holdTtl.count(), 0));
  l->lastExpiryMs = std::max(l->lastExpiryMs, call.expiresMs);
  auto held = l->calls.emplace(callId, std::move(call)).first;
  enqueue(l, *batch, std::move(spec), BatchOp{'R', uv_hrtime(), std::move(done), &held->first, {}});
}

void RedisBudgetStore::settle(const std::string& callId, const std::vector<Charge>& actual,
                              Done done) {
  finish(local(), 'S', callId, &actual, std::move(done));
}

void RedisBudgetStore::release(const std::string& callId, const std::vector<Charge>&, Done done) {
  finish(local(), 'L', callId, nullptr, std::move(done));
}

// Ends a call's holds: a settle commits at most what was held (the rest is an overrun that
// trips the pool), a release commits nothing, an expiry commits the hold. A call whose hold
// has expired is committed so before a late settle is refused.
void RedisBudgetStore::finish(PerLoop* l, char kind, const std::string& callId,
                              const std::vector<Charge>* actual, Done done) {
  const char* name = kind == 'S' ? "settle" : "release";
  auto refuse = [&](BudgetOutcome out) {
    if (observer && kind != 'X') observer(name, out.status, 0);
    if (done) done(std::move(out));
  };
  if (!l) {
    refuse(unavailable("no Redis connection on this thread"));
    return;
  }
  auto it = l->calls.find(callId);
  if (kind == 'S' && it == l->calls.end()) {
    // After its hold expired (and was committed): only an overrun is still news.
    if (auto late = l->expired.take(callId)) {
      settleLate(l, callId, *late, *actual, std::move(done));
      return;
    }
  }
  if (it == l->calls.end() || it->second.pending) {
    if (kind == 'L' && it == l->calls.end()) remember(l, callId);  // a late reserve is refused
    refuse(BudgetOutcome{BudgetStatus::kUnknownCall, "", "no hold for call " + callId, 0});
    return;
  }
  if (kind != 'X' && nowMs() >= it->second.expiresMs) {
    finish(l, 'X', callId, nullptr, nullptr);  // committed, not refunded: the call may have run
    if (kind == 'S') {
      finish(l, kind, callId, actual, std::move(done));  // now a late settle
      return;
    }
    refuse(BudgetOutcome{BudgetStatus::kUnknownCall, "", "no hold for call " + callId, 0});
    return;
  }
  l->unqueueExpiry(&it->second);
  Call call = std::move(it->second);
  l->calls.erase(it);
  remember(l, callId);
  std::string key;
  BudgetOutcome refusal;
  Batch* batch = batchFor(l, call.holds, &key, &refusal);
  if (!batch) {
    refuse(std::move(refusal));  // its pools left the policy: their holds expire
    return;
  }
  BudgetOutcome out;
  for (size_t i = 0; i < call.holds.size(); ++i) {
    const auto& h = call.holds[i];
    std::array<int64_t, 2> held{h.effort, h.risk}, cost = held, commit{0, 0};
    std::array<bool, 2> trip{false, false};
    if (kind == 'S') {
      for (const auto& c : *actual) {
        if (c.pool == h.pool) cost = {c.effort, c.risk};
      }
    }
    for (int j = 0; j < 2; ++j) {
      if (held[j] <= 0 || kind == 'L') continue;
      if (cost[j] < 0) cost[j] = held[j];  // no real cost: the estimate is the cost
      commit[j] = std::min(cost[j], held[j]);
      if (cost[j] > held[j]) {
        // Never commit more than was held; record the overrun and trip the pool.
        trip[j] = true;
        out.addOverrun(cost[j] - held[j]);
        out.pool = h.pool;
      }
    }
    // Holds of another epoch went with their budget (flushed, or initialised again).
    if ((i == 0 ? call.gen : call.gens[i - 1]) != l->holders[h.pool].gen) continue;
    for (int j = 0; j < 2; ++j) {
      batch->ended[i][j] += held[j];
      batch->committed[i][j] += commit[j];
      batch->trips[i][j] = batch->trips[i][j] || trip[j];
    }
  }
  if (out.overrun > 0)
    out.reason = "call " + callId + " cost " + std::to_string(out.overrun) + " more than was held";
  enqueue(l, *batch, {}, BatchOp{kind, uv_hrtime(), std::move(done), nullptr, std::move(out)});
  if (kind == 'X') l->expired.add(callId, std::move(call));
}

// A settle after the call's hold expired and was committed: a real cost above what was held
// trips the pool (a finish that ends and commits nothing more); anything else is refused.
void RedisBudgetStore::settleLate(PerLoop* l, const std::string& callId, const Call& call,
                                  const std::vector<Charge>& actual, Done done) {
  BudgetOutcome out;
  std::vector<std::array<bool, 2>> trips(call.holds.size(), {false, false});
  bool tripped = false;
  for (size_t i = 0; i < call.holds.size(); ++i) {
    const auto& h = call.holds[i];
    std::array<int64_t, 2> held{h.effort, h.risk};
    for (const auto& c : actual) {
      if (c.pool != h.pool) continue;
      std::array<int64_t, 2> cost{c.effort, c.risk};
      for (int j = 0; j < 2; ++j) {
        if (held[j] <= 0 || cost[j] <= held[j]) continue;
        trips[i][j] = true;
        out.addOverrun(cost[j] - held[j]);
        out.pool = h.pool;
        tripped = true;
      }
    }
  }
  std::string key;
  BudgetOutcome refusal;
  Batch* batch = tripped ? batchFor(l, call.holds, &key, &refusal) : nullptr;
  if (!batch) {  // no overrun, or its pools left the policy
    BudgetOutcome no{BudgetStatus::kUnknownCall, "", "no hold for call " + callId, 0};
    if (observer) observer("settle", no.status, 0);
    if (done) done(std::move(no));
    return;
  }
  for (size_t i = 0; i < call.holds.size(); ++i) {
    if ((i == 0 ? call.gen : call.gens[i - 1]) != l->holders[call.holds[i].pool].gen) continue;
    for (int j = 0; j < 2; ++j) batch->trips[i][j] = batch->trips[i][j] || trips[i][j];
  }
  out.reason = "call " + callId + " cost " + std::to_string(out.overrun) +
               " more than was held (settled after its hold expired)";
  enqueue(l, *batch, {}, BatchOp{'S', uv_hrtime(), std::move(done), nullptr, std::move(out)});
}

void RedisBudgetStore::remember(PerLoop* l, const std::string& callId) {
  l->done.insert(callId);
}

// Finishes the calls whose holds expired; runs again at the next expiry.
void RedisBudgetStore::expireCalls(PerLoop* l) {
  uint64_t now = nowMs();
  while (l->firstExpiry && l->firstExpiry->expiresMs <= now) {
    std::string callId = *l->firstExpiry->id;
    finish(l, 'X', callId, nullptr, nullptr);  // takes it out of the list
  }
  armExpiry(l);
}

void RedisBudgetStore::armExpiry(PerLoop* l) {
  if (!l->firstExpiry || l->detached) return;
  uint64_t due = l->firstExpiry->expiresMs, now = nowMs();
  uint64_t wait = due > now ? due - now : 0;
  auto* t = l->expiryTimer;
  if (uv_is_active(reinterpret_cast<uv_handle_t*>(t)) && uv_timer_get_due_in(t) <= wait) return;
  uv_timer_start(
      t,
      [](uv_timer_t* h) {
        auto* pl = static_cast<PerLoop*>(h->data);
        pl->store->expireCalls(pl);
      },
      wait, 0);
}

// Dirty holders with nothing on the wire get a batch of their own, carrying the sync (and
// the finishes it waited for), every kSyncDelayMs until one is answered.
void RedisBudgetStore::syncDirty(PerLoop* l) {
  bool any = false;
  for (auto& [pool, h] : l->holders) {
    if (!h.dirty) continue;
    any = true;
    if (h.inFlight > 0) continue;
    std::string key;
    BudgetOutcome refusal;
    if (!batchFor(l, {Charge{pool, 0, 0}}, &key, &refusal)) h.dirty = false;  // left the policy
  }
  if (any)
    flush(l, false, true, true);
  else if (!l->detached)
    uv_timer_stop(l->syncTimer);
}

void RedisBudgetStore::flush(PerLoop* l, bool force, bool write, bool empty) {
  // A send can be answered at once (the store's breaker is open), and the answer flushes
  // again: that flush is left to this one, which looks at the batches once more.
  if (l->flushing) {
    l->flushAgain = true;
    return;
  }
  l->flushing = true;
  do {
    l->flushAgain = false;
    flushOnce(l, force, write, empty);
  } while (l->flushAgain);
  l->flushing = false;
}

void RedisBudgetStore::flushOnce(PerLoop* l, bool force, bool write, bool empty) {
  if (!l->detached) {
    uv_timer_stop(l->settleTimer);
    uv_check_stop(l->check);
    uv_idle_stop(l->idle);
  }
  l->armed = false;
  // While kMaxInFlight scripts of the same pools are on the wire, their next batch grows
  // until one is answered: a script's fixed cost in Redis (its call, the budget's read and
  // write, Lua's tables) is then shared by more operations when Redis is busy, and nothing
  // waits when it is not. Redis runs one connection's commands in order, so a third script
  // sent at once would wait behind the two anyway; with two out, one runs while the next
  // is queued, and the batch goes when the first is answered. A batch that syncs a holder
  // waits until nothing of that pool is on the wire (the sync says what the holder holds).
  // A batch of finishes alone waits kSettleDelayMs for a reserve to go with, even when an
  // answer frees its way: a script call for finishes alone costs Redis as much as one that
  // also reserves.
  bool sent = false;
  uint64_t now = uv_hrtime(), wait = UINT64_MAX;
  for (auto it = l->batches.begin(); it != l->batches.end();) {
    const Batch& b = it->second;
    bool hold = false;
    if (auto f = l->inFlight.find(it->first); f != l->inFlight.end() && f->second >= kMaxInFlight)
      hold = true;
    for (const auto& p : b.pools) {
      auto h = l->holders.find(p.name);
      if (h != l->holders.end() && h->second.dirty && h->second.inFlight > 0) hold = true;
    }
    uint64_t waited = b.ops.empty() ? 0 : now - b.ops.front().started;
    bool early = !force && !b.ops.empty() && b.specs.empty() && waited < kSettleDelayMs * 1'000'000;
    if (early && !hold) wait = std::min(wait, kSettleDelayMs * 1'000'000 - waited);
    if ((hold && !force) || (b.ops.empty() && !empty) || early) {
      ++it;
      continue;
    }
    Batch batch = std::move(it->second);
    std::string key = it->first;
    it = l->batches.erase(it);
    send(l, key, std::move(batch));
    sent = true;
  }
  if (wait != UINT64_MAX && !l->detached) {
    uv_timer_start(
        l->settleTimer,
        [](uv_timer_t* t) {
          auto* pl = static_cast<PerLoop*>(t->data);
          pl->store->flush(pl);
        },
        (wait + 999'999) / 1'000'000, 0);
  }
  if (sent && write) l->client->flushWrites();
}

void RedisBudgetStore::send(PerLoop* l, const std::string& key, Batch batch) {
  // A reserve's latency counts from its call (the wait for a batch is the call's wait too);
  // a finish's from here: nothing waited for it until now.
  uint64_t now = uv_hrtime();
  for (auto& op : batch.ops) {
    if (op.kind != 'R') op.started = now;
  }
  batch.seq = ++l->seq;
  uint64_t ms = nowMs();
  std::vector<std::string> keys, args;
  keys.reserve(batch.pools.size() * 3);
  // Identical reserves in a row go as one run: Redis takes as many of them as fit at once.
  std::vector<std::string> runs;
  batch.runs.clear();
  for (size_t k = 0; k < batch.specs.size(); ++k) {
    if (k > 0 && batch.specs[k] == batch.specs[k - 1]) {
      ++batch.runs.back();
      continue;
    }
    runs.push_back(batch.specs[k]);
    batch.runs.push_back(1);
  }
  for (size_t r = 0; r < runs.size(); ++r) runs[r].insert(0, std::to_string(batch.runs[r]));
  batch.specs.clear();
  args.reserve(4 + batch.pools.size() * 8 + runs.size());
  args.push_back(std::to_string(runs.size()));
  args.push_back(l->holder);
  args.push_back(std::to_string(batch.seq));
  args.push_back(std::to_string(l->lastExpiryMs > ms ? l->lastExpiryMs - ms : 0));
  batch.synced.assign(batch.pools.size(), false);
  for (size_t i = 0; i < batch.pools.size(); ++i) {
    const auto& p = batch.pools[i];
    for (char k : {'b', 'h', 'x'}) keys.push_back(keyOf(p.name, k));
    Holder& h = l->holders[p.name];
    std::string sync;
    if (h.dirty) {
      // What the holder holds, the finishes of this batch not yet subtracted.
      sync = std::to_string(h.held[0]) + " " + std::to_string(h.held[1]);
      for (const auto& lost : h.lost) {
        sync += lost.unrun ? " !" : " ";
        sync += std::to_string(lost.seq) + ":" + std::to_string(lost.committed[0]) + ":" +
                std::to_string(lost.committed[1]) + ":" + (lost.trips[0] ? "1" : "0") + ":" +
                (lost.trips[1] ? "1" : "0");
      }
      batch.synced[i] = true;
    }
    // The batch's finishes, summed: what ends, what is committed, what trips.
    const auto &e = batch.ended[i], &c = batch.committed[i];
    const auto& t = batch.trips[i];
    std::string fin;
    if (e[0] || e[1] || c[0] || c[1] || t[0] || t[1]) {
      fin = std::to_string(e[0]) + " " + std::to_string(e[1]) + " " + std::to_string(c[0]) + " " +
            std::to_string(c[1]) + (t[0] ? " 1" : " 0") + (t[1] ? " 1" : " 0");
    }
    h.held[0] -= e[0];
    h.held[1] -= e[1];
    ++h.inFlight;
    for (std::string v : {p.name, std::to_string(p.effortLimit), std::to_string(p.effortPeriodMs),
                          std::to_string(p.riskLimit), std::to_string(p.riskPeriodMs), h.epoch,
                          std::move(sync), std::move(fin)})
      args.push_back(std::move(v));
  }
  for (auto& r : runs) args.push_back(std::move(r));
  ++l->inFlight[key];
  l->client->eval(batchScript(), std::move(keys), std::move(args),
                  [this, l, key, batch = std::move(batch)](Result<RedisReply> r) mutable {
                    answer(l, key, batch, r);
                    if (l->spare.size() < kSpareBatches) {
                      batch.clear();
                      l->spare.push_back(std::move(batch));
                    }
                  });
}

void RedisBudgetStore::answer(PerLoop* l, const std::string& key, Batch& batch,
                              const Result<RedisReply>& r) {
  if (auto it = l->inFlight.find(key); it != l->inFlight.end() && --it->second == 0)
    l->inFlight.erase(it);
  size_t n = batch.pools.size();
  std::string failure;
  // An error reply is a script that did not run (refused before it: BUSY, OOM, STALE…),
  // unless it failed part way ("ERR …": a fault of the script's own).
  bool unrun = (!r && r.error().code == RedisClient::kNotRun) ||
               (r && r.value().isError() && !std::string_view(r.value().str).starts_with("ERR"));
  if (!r)
    failure = r.error().message;
  else if (r.value().isError())
    failure = "redis: " + r.value().str;
  else if (r.value().type != RedisReply::Type::kArray ||
           r.value().elements.size() != n + batch.runs.size())
    failure = "redis: unexpected reply to the budget script";
  for (size_t i = 0; i < n; ++i) {
    Holder& h = l->holders[batch.pools[i].name];
    --h.inFlight;
    if (!failure.empty()) {
      // The batch may or may not have run: the next batch on the pool syncs the holder.
      h.dirty = true;
      h.dirtySeq = batch.seq;
      const auto& c = batch.committed[i];
      const auto& t = batch.trips[i];
      if (c[0] > 0 || c[1] > 0 || t[0] || t[1]) h.lost.push_back({batch.seq, c, t, unrun});
      continue;
    }
    const std::string& epoch = r.value().elements[i].str;
    if (epoch != h.epoch) {
      // A budget of another epoch (or none): what this worker held went with the old one.
      h = Holder{epoch, h.gen + 1, {0, 0}, false, 0, {}, h.inFlight};
    } else if (batch.synced[i]) {
      std::erase_if(h.lost, [&](const Holder::Lost& x) { return x.seq < batch.seq; });
      if (h.dirtySeq < batch.seq) h.dirty = false;
    }
  }
  if (!failure.empty() && !l->detached &&
      !uv_is_active(reinterpret_cast<uv_handle_t*>(l->syncTimer))) {
    uv_timer_start(
        l->syncTimer,
        [](uv_timer_t* t) {
          auto* pl = static_cast<PerLoop*>(t->data);
          pl->store->syncDirty(pl);
        },
        kSyncDelayMs, kSyncDelayMs);
  }
  bool dirty = false;
  for (const auto& [pool, h] : l->holders) dirty |= h.dirty;
  if (!dirty && !l->detached) uv_timer_stop(l->syncTimer);

  // Reserves by run: the first `allowed` of a run are held, the rest refused with its reason.
  size_t run = 0, inRun = 0;
  int64_t allowed = 0;
  BudgetOutcome refused;
  auto readRun = [&] {
    const auto& e = r.value().elements[n + run];
    refused = BudgetOutcome{};
    if (e.type == RedisReply::Type::kInteger) {
      allowed = e.integer;
    } else if (e.elements.size() == 4) {
      allowed = e.elements[0].integer;
      refused = BudgetOutcome{statusOf(e.elements[1].str), e.elements[2].str, e.elements[3].str, 0};
    } else {
      allowed = 0;
      refused = unavailable("redis: unexpected reply to the budget script");
    }
  };
  for (size_t k = 0; k < batch.ops.size(); ++k) {
    auto& op = batch.ops[k];
    BudgetOutcome out;
    if (!failure.empty()) {
      out = unavailable(failure);
    } else if (op.kind != 'R') {
      out = std::move(op.outcome);
    } else {
      if (inRun == 0) readRun();
      out = static_cast<int64_t>(inRun) < allowed ? BudgetOutcome{} : refused;
      if (++inRun == batch.runs[run]) ++run, inRun = 0;
    }
    std::vector<Done> waiters;
    if (op.kind == 'R') {
      auto it = l->calls.find(*op.callId);
      if (it != l->calls.end()) {
        Call& call = it->second;
        waiters = std::move(call.waiters);
        if (out.status == BudgetStatus::kOk) {
          // Held: counted in the holder until its finish is sent.
          call.pending = false;
          for (size_t i = 0; i < call.holds.size(); ++i) {
            Holder& h = l->holders[call.holds[i].pool];
            if (i == 0)
              call.gen = h.gen;
            else
              call.gens.push_back(h.gen);
            h.held[0] += call.holds[i].effort;
            h.held[1] += call.holds[i].risk;
          }
          l->queueExpiry(&call, &it->first);
          armExpiry(l);
        } else {
          // Refused, or lost: a lost reserve's call is halted, and the sync that follows
          // says the holder does not hold it.
          l->calls.erase(it);
        }
      }
    }
    if (observer && op.kind != 'X') {
      observer(op.kind == 'R'   ? "reserve"
               : op.kind == 'S' ? "settle"
                                : "release",
               out.status, static_cast<double>(uv_hrtime() - op.started) / 1e9);
    }
    if (op.done) op.done(out);
    for (auto& w : waiters) w(out);
  }
  // Operations that waited for this answer go now (written by the client at the end of this
  // turn: this runs inside hiredis's reply processing).
  if (local() == l && !l->batches.empty()) flush(l, false, false);
}

std::pair<std::vector<std::string>, std::vector<std::string>> RedisBudgetStore::poolCall(
    const char* op, const char* mode, const PoolSpec& s) {
  std::vector<std::string> keys;
  for (char k : kPoolKeys) keys.push_back(keyOf(s.name, k));
  std::vector<std::string> args{op,
                                mode,
                                "0",
                                "1",
                                s.name,
                                "0",
                                "0",
                                std::to_string(s.effortLimit),
                                std::to_string(s.effortPeriodMs),
                                std::to_string(s.riskLimit),
                                std::to_string(s.riskPeriodMs)};
  return {std::move(keys), std::move(args)};
}

std::vector<BudgetView> RedisBudgetStore::view() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return cache_;
}

void RedisBudgetStore::refresh(std::function<void()> done) {
  PerLoop* l = local();
  auto specs = this->specs();
  if (!l || specs->empty()) {
    done();
    return;
  }
  // This worker's expired holds and waiting finishes go first: Redis runs them before the
  // views, on the same connection.
  expireCalls(l);
  flush(l);
  // One script call per pool: pools are in different slots.
  struct Gather {
    std::vector<BudgetView> views;
    size_t left;
    std::function<void()> done;
  };
  auto g = std::make_shared<Gather>(Gather{{}, specs->size(), std::move(done)});
  for (const auto& s : *specs) {
    auto [keys, args] = poolCall("view", "", s);
    l->client->eval(
        budgetScript(), std::move(keys), std::move(args), [this, g, s](Result<RedisReply> r) {
          bool ok = r && r.value().type == RedisReply::Type::kArray;
          for (const char* dim : {"effort", "risk"}) {
            int64_t limit = std::string_view(dim) == "effort" ? s.effortLimit : s.riskLimit;
            if (limit < 0) continue;
            BudgetView v{s.name, dim, limit, 0, 0, 0, false};
            v.initialised = false;
            v.available = false;
            if (ok) {
              for (const auto& e : r.value().elements) {
                if (e.elements.size() != 7 || e.elements[1].str != dim) continue;
                v.available = true;
                v.initialised = e.elements[2].integer == 1;
                v.committed = e.elements[3].integer;
                v.held = e.elements[4].integer;
                v.periodEndMs = e.elements[5].integer;
                v.tripped = e.elements[6].integer != 0;
              }
            }
            g->views.push_back(std::move(v));
          }
          if (--g->left == 0) {
            std::sort(g->views.begin(), g->views.end(), [](const auto& a, const auto& b) {
              return std::tie(a.pool, a.dimension) < std::tie(b.pool, b.dimension);
            });
            {
              std::lock_guard<std::mutex> lock(mutex_);
              cache_ = g->views;
            }
            g->done();
          }
        });
  }
}

Result<std::vector<RedisBudgetStore::InitResult>> RedisBudgetStore::initPools(
    const PolicySet& set, const Options& options, bool reset) {
  auto specs = specsOf(set);
  if (!specs) return specs.error();
  return initSpecs(specs.value(), options, reset);
}

Result<std::vector<RedisBudgetStore::InitResult>> RedisBudgetStore::initSpecs(
    const std::vector<PoolSpec>& specs, const Options& options, bool reset) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  std::vector<InitResult> out;
  std::string failure;
  {
    RedisClient client(
        &loop, RedisClient::Options{options.seeds,
                                    std::max(options.timeout, std::chrono::milliseconds(2000)),
                                    options.auth});
    for (const auto& s : specs) {
      auto [keys, args] = poolCall("init", reset ? "reset" : "missing", s);
      bool answered = false;
      client.eval(budgetScript(), std::move(keys), std::move(args),
                  [&, name = s.name](Result<RedisReply> r) {
                    answered = true;
                    if (!r) {
                      if (failure.empty()) failure = r.error().message;
                    } else if (r.value().isError() || r.value().elements.size() != 1) {
                      if (failure.empty()) failure = "redis: " + r.value().str;
                    } else {
                      out.push_back({name, r.value().elements[0].str == "created"});
                    }
                  });
      while (!answered) uv_run(&loop, UV_RUN_ONCE);  // one at a time; every request has a deadline
    }
    client.close(nullptr);
    uv_run(&loop, UV_RUN_DEFAULT);
  }
  uv_loop_close(&loop);
  if (!failure.empty()) return Error{-1, "pools init: " + failure};
  return out;
}

}  // namespace tollgate
