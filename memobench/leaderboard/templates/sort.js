(function(){
var table=document.getElementById('lb');if(!table)return;
var tbody=table.tBodies[0],heads=table.tHead.rows[0].cells,state={col:-1,dir:1};
function key(td,type){var v=td.getAttribute('data-v');
 if(type==='num'){return (v===null||v==='')?null:parseFloat(v);}return (v!==null?v:td.textContent).toLowerCase();}
function sortBy(i,dir){var type=heads[i].getAttribute('data-type'),rows=Array.prototype.slice.call(tbody.rows);
 rows.sort(function(a,b){var x=key(a.cells[i],type),y=key(b.cells[i],type),o=a.getAttribute('data-i')-b.getAttribute('data-i');
  if(x===null&&y===null)return o;if(x===null)return 1;if(y===null)return -1;
  var c=type==='num'?x-y:x.localeCompare(y);return c!==0?dir*c:o;});
 rows.forEach(function(r){tbody.appendChild(r);});
 for(var j=0;j<heads.length;j++)heads[j].removeAttribute('aria-sort');
 heads[i].setAttribute('aria-sort',dir>0?'ascending':'descending');}
Array.prototype.forEach.call(heads,function(h,i){if(!h.getAttribute('data-type'))return;h.tabIndex=0;
 h.addEventListener('click',function(){var dir=state.col===i?-state.dir:(h.getAttribute('data-better')==='higher'?-1:1);
  state={col:i,dir:dir};sortBy(i,dir);});
 h.addEventListener('keydown',function(e){if(e.key==='Enter'||e.key===' '){e.preventDefault();h.click();}});});
var boxes=document.querySelectorAll('input[data-filter]');
function apply(){var shown=0;Array.prototype.forEach.call(tbody.rows,function(r){var hide=false;
 Array.prototype.forEach.call(boxes,function(b){if(!b.checked&&r.getAttribute('data-'+b.getAttribute('data-filter'))===b.value)hide=true;});
 r.hidden=hide;if(!hide)shown++;});document.getElementById('shown').textContent=shown;}
Array.prototype.forEach.call(boxes,function(b){b.addEventListener('change',apply);});
})();
